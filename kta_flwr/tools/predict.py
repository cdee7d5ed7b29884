"""Use a model a run kept: predictions from a node's checkpoint (or the server's global model).

::

    python -m kta_flwr.tools.predict --model ~/kta-flwr/models/partition-0 --input x.npy \\
        [--output pred.npy] [--probs] [--expect architecture=mlp fingerprint=...]

``--model`` is a checkpoint file or a node's folder holding one (``<strategy>.pt``);
``--input`` an ``.npy`` array of inputs as the model reads them (float32 images
``[M, C, H, W]``, normalised as in training, or int64 token ids ``[M, L]``). Prints one
predicted class per row (or writes them, or the class probabilities with ``--probs``,
to ``--output``). ``--expect key=value`` refuses a checkpoint whose metadata differs.
In Python: :func:`kta_flwr.task.checkpoint.load_personalized`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from kta_flwr.config import ConfigError
from kta_flwr.task.checkpoint import check_meta, model_from, read_checkpoint, resolve_checkpoint
from kta_flwr.task.training import predict_logits, resolve_device
from kta_flwr.tools.cli import overrides


def predict(model_path: Path, inputs: np.ndarray, expected: dict[str, object] | None = None,
            device: str = "cpu") -> np.ndarray:
    """Class probabilities ``[M, C]`` of the checkpoint's model on ``inputs``.

    Raises:
        CheckpointError: no checkpoint, metadata that differs from ``expected``, or
            tensors that do not fit the architecture it names (file and tensor named).
        ConfigError: ``inputs`` whose rows do not have the checkpoint's input shape.
    """
    path = resolve_checkpoint(model_path)
    saved = read_checkpoint(path)
    if tuple(inputs.shape[1:]) != tuple(saved.meta.input_shape):
        raise ConfigError(
            f"--input rows have shape {list(inputs.shape[1:])}; the checkpoint's model "
            f"reads {list(saved.meta.input_shape)} ('input_shape')"
        )
    check_meta(saved.meta, expected or {}, path)
    model = model_from(saved, device, path)
    logits = predict_logits(model, inputs, resolve_device(device))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m kta_flwr.tools.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint file or node folder")
    parser.add_argument("--input", type=Path, required=True, help=".npy inputs")
    parser.add_argument("--output", type=Path, default=None, help=".npy to write (default: print)")
    parser.add_argument("--probs", action="store_true", help="class probabilities, not classes")
    parser.add_argument("--expect", nargs="*", default=[], metavar="KEY=VALUE",
                        help="metadata the checkpoint must have, e.g. architecture=mlp")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    try:
        if not args.input.is_file():
            raise ConfigError(f"--input {args.input}: no such file")
        probs = predict(args.model, np.load(args.input), overrides(args.expect), args.device)
    except ConfigError as err:  # CheckpointError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = probs if args.probs else probs.argmax(axis=1)
    if args.output is None:
        np.savetxt(sys.stdout, out, fmt="%.6f" if args.probs else "%d")
    else:
        np.save(args.output, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
