"""What a real deployment needs besides Flower's own commands: an app folder for ``flwr run``,
one partition per SuperNode, TLS certificates and SuperNode keys. docs/flower.md is the recipe.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from fl_core.config import ConfigError, RunConfig, dump_config
from fl_core.data.federated import MANIFEST, TENSORS

from .client import CONFIG_KEY, PartitionData


def _toml_str(value: str) -> str:
    # a JSON string is a valid TOML basic string (same escapes) when non-ASCII is left as is
    return json.dumps(value, ensure_ascii=False)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_app(
    app_dir: str | os.PathLike,
    config: RunConfig,
    partition_dir: str | os.PathLike,
    out: str | os.PathLike,
    round_timeout: float = 0.0,
    node_wait: float = 120.0,
) -> Path:
    """Write ``app_dir/pyproject.toml``: a Flower app whose ServerApp and ClientApp are ktl's,
    with the run's config, output folder and data shape as its run config."""
    data = PartitionData(partition_dir)
    total = config.data.num_clients + config.federation.num_new_clients
    if data.num_clients != total:
        raise ConfigError(
            f"the partition folder {str(partition_dir)!r} has {data.num_clients} clients but the "
            f"config asks for data.num_clients + federation.num_new_clients = {total}"
        )
    app = Path(app_dir)
    app.mkdir(parents=True, exist_ok=True)
    text = dump_config(config)
    shape = "x".join(str(d) for d in data.input_shape)
    toml = f"""# Written by `ktl flower app`; run with: flwr run {app} <superlink connection> --stream
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "ktl-{config.algorithm.name}"
version = "1.0.0"
description = "ktl {config.algorithm.name} on {config.data.dataset} as a Flower app"
license = "Apache-2.0"
dependencies = ["ktl[flower]"]

[tool.flwr.app]
publisher = "ktl"

[tool.flwr.app.components]
serverapp = "fl_core.flower.server_app:app"
clientapp = "fl_core.flower.client:app"

[tool.flwr.app.config]
out = {_toml_str(str(Path(out).resolve()))}
num-partitions = {data.num_clients}
num-classes = {data.num_classes}
input-shape = "{shape}"
normalization = {_toml_str(json.dumps(data.manifest.get("normalization")))}
round-timeout = {float(round_timeout)}
node-wait = {float(node_wait)}
{CONFIG_KEY} = {_toml_str(text)}
"""
    _atomic_write(app / "pyproject.toml", toml)
    return app


def split_partition(partition_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """One folder per client (``client_<i>``), each holding only that client's tensors and the
    full manifest: what one SuperNode's machine receives."""
    src = Path(partition_dir)
    data = PartitionData(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    with safe_open(str(src / TENSORS), framework="pt") as f:
        for i in range(data.num_clients):
            pre = f"client{i:06d}."
            tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(pre)}
            final = out / f"client_{i}"
            tmp = out / f".client_{i}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            save_file(tensors, str(tmp / TENSORS))
            manifest = dict(data.manifest)
            manifest["clients_in_folder"] = [i]
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            folders.append(final)
    return folders


def make_tls_certificates(
    folder: str | os.PathLike, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365
) -> dict[str, Path]:
    """A private CA (``ca.crt``) and a SuperLink certificate signed by it (``server.pem`` +
    ``server.key``) valid for ``hosts``. For tests and private networks; use your
    organisation's CA otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ktl flower CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca": out / "ca.crt",
        "cert": out / "server.pem",
        "key": out / "server.key",
    }
    files["ca"].write_bytes(ca_cert.public_bytes(pem))
    files["cert"].write_bytes(cert.public_bytes(pem))
    files["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files["key"].chmod(0o600)
    return files


def make_supernode_keys(folder: str | os.PathLike, name: str) -> dict[str, Path]:
    """An EC key pair for SuperNode authentication: ``<name>`` (private, OpenSSH, for
    ``flower-supernode --auth-supernode-private-key``) and ``<name>.pub`` (OpenSSH, for
    ``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b" "
        + name.encode()
        + b"\n"
    )
    return {"private": private, "public": public}


def write_connection(
    flwr_home: str | os.PathLike,
    name: str,
    address: str,
    root_certificates: str | os.PathLike | None = None,
) -> Path:
    """Add a SuperLink connection to ``$FLWR_HOME/config.toml`` (replacing the file: a
    fresh home per deployment keeps ``flwr``'s state apart)."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {_toml_str(name)}", "", f"[superlink.{name}]"]
    lines.append(f"address = {_toml_str(address)}")
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_str(str(Path(root_certificates).resolve()))}")
    path = home / "config.toml"
    _atomic_write(path, "\n".join(lines) + "\n")
    return path
