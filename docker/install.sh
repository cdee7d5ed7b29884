#!/usr/bin/env sh
# Both images' install step (run inside the Dockerfiles' first stage): the project and
# its dependencies into the virtualenv /opt/kta, from the wheelhouse in /tmp/wheels
# (docker/make_wheelhouse.sh; no network), then what a running node never reads is
# removed: the packages' own test suites, C/C++ headers (torch's are for building
# extensions) and pip itself (nothing is installed at run time).
set -eu
python3 -m venv /opt/kta
pip="/opt/kta/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels"
$pip -r /tmp/wheels/requirements.txt
$pip --no-deps kta-flwr
site="$(/opt/kta/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
find "$site" -depth -type d -name tests -exec rm -rf {} +
rm -rf "$site/torch/test" "$site/torch/include" "$site/pyarrow/include"
/opt/kta/bin/python -m pip uninstall --quiet --yes pip
/opt/kta/bin/python -c 'import kta_flwr.task.models, kta_flwr.flower.strategies, torch, torchvision, transformers, flwr_datasets'
echo "installed: $(du -sh /opt/kta | cut -f1) in /opt/kta"
