"""A secure deployment with real processes on 127.0.0.1: TLS + SuperNode authentication."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from kta_flwr.tools.certs import make_credentials
from kta_flwr.tools.federation import LocalFederation
from tests.conftest import read_results

pytestmark = pytest.mark.slow

TINY = {"strategy": "kta", "num-server-rounds": 1, "reference-size": 100, "test-size": 100,
        "local-epochs": 1, "distill-epochs": 1, "tracking": "none"}


def test_credentials(tmp_path):
    creds = make_credentials(tmp_path, 2, ("localhost", "127.0.0.1", "superlink", "edge.example"))
    cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "edge.example"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for i, key in enumerate(creds.supernode_keys):
        private = load_ssh_private_key(key.read_bytes(), None)
        assert load_ssh_public_key(creds.public_key(i).read_bytes()) == private.public_key()
        assert key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        make_credentials(tmp_path, 1)


def test_tls_and_node_auth_refuse_strangers_and_the_run_completes(tmp_path, app_dir):
    """3 registered SuperNodes over TLS run kta; a SuperNode with an unregistered key and one
    without TLS are refused, and the run goes on with the three."""
    creds = make_credentials(tmp_path / "certs", 4)
    out = tmp_path / "out"
    with LocalFederation(tmp_path / "fed", 3, credentials=creds) as fed:
        stranger = fed.start_supernode(2, key_index=3, wait=False)  # key 3 was never registered
        plaintext = fed.start_supernode(1, insecure=True)  # no TLS, no key
        proc = fed.submit(app_dir, {**TINY, "min-nodes": 3, "output-dir": str(out)}, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        assert stranger.wait(timeout=60) != 0  # the SuperLink refused to activate it
        assert "Failed to activate SuperNode" in (fed.logs / "supernode-2-key3.log").read_text()
        assert plaintext.poll() is None  # still knocking: never connected
        insecure_log = (fed.logs / "supernode-1-insecure.log").read_text()
        assert "Connection attempt failed" in insecure_log
    (res,) = read_results(out)
    assert [row["clients_evaluated"] for row in res["rounds"]] == [3]
    assert len(res["summary"]["bytes_per_node"]) == 3
