"""TLS certificates and SuperNode authentication keys for a deployment.

::

    python -m kta_flwr.tools.certs DIR --supernodes 3 [--host superlink --host my.server.org]

writes into ``DIR``:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep ``ca.key`` private);
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1`` and every ``--host`` (default also ``superlink``, the
  compose service name);
- ``supernode-<i>`` / ``supernode-<i>.pub``: an ECDSA P-384 key pair per SuperNode in
  OpenSSH format, what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read.

Private keys are written with mode 0600. Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Names the SuperLink certificate is always valid for.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "superlink")
VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    """Paths of what :func:`make_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    supernode_keys: tuple[Path, ...]  # private keys; the public key is ``<path>.pub``

    def public_key(self, index: int) -> Path:
        """The OpenSSH public key of SuperNode ``index``."""
        return self.supernode_keys[index].with_suffix(".pub")

    @classmethod
    def in_dir(cls, folder: Path, num_supernodes: int) -> Credentials:
        """The paths :func:`make_credentials` uses in ``folder`` (e.g. where a container
        mounts them); nothing is read or written."""
        folder = Path(folder)
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key",
                   tuple(folder / f"supernode-{i}" for i in range(num_supernodes)))

    def missing(self) -> list[Path]:
        """The files of this set that do not exist."""
        files = [self.ca_cert, self.server_cert, self.server_key, *self.supernode_keys]
        return [path for path in files if not path.is_file()]


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; use an empty folder (nothing is overwritten)")
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _certificate(  # pylint: disable=too-many-arguments
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_credentials(
    out_dir: Path, num_supernodes: int, hosts: tuple[str, ...] = DEFAULT_HOSTS
) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``num_supernodes`` key pairs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate("kta-flwr CA", ca_key, "kta-flwr CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    hosts = tuple(dict.fromkeys((*DEFAULT_HOSTS[:2], *hosts)))
    server_cert = _certificate("superlink", server_key, "kta-flwr CA", ca_key, ca=False, hosts=hosts)
    creds = Credentials.in_dir(out_dir, num_supernodes)
    _write(out_dir / "ca.key", _pem_key(ca_key), private=True)
    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(creds.server_key, _pem_key(server_key), private=True)
    _write(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for i in range(num_supernodes):
        add_supernode_key(out_dir, i)
    return creds


def add_supernode_key(out_dir: Path, index: int) -> Path:
    """Write one more SuperNode key pair ``supernode-<index>`` (+ ``.pub``); returns the
    private key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    path = Path(out_dir) / f"supernode-{index}"
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(path.with_suffix(".pub"), key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m kta_flwr.tools.certs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--supernodes", type=int, default=3, help="key pairs to create")
    parser.add_argument("--host", action="append", default=[],
                        help="extra name or IP the SuperLink certificate is valid for")
    args = parser.parse_args(argv)
    try:
        creds = make_credentials(args.out_dir, args.supernodes, (*DEFAULT_HOSTS, *args.host))
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {creds.ca_cert}, {creds.server_cert}, {creds.server_key} and "
          f"{len(creds.supernode_keys)} SuperNode key pairs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
