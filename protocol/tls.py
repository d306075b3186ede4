"""Cluster certificate authority, node credentials and mutual-TLS identity checks.

Problem: agents accept connections from anywhere on the network, and a node's identity decides
what it may do (vote, coordinate, receive activations). Identity must come from something a peer
cannot forge in a message field.

Options rejected:
- A shared secret token in HELLO: one leaked file impersonates every node, and revoking one node
  means rotating the secret everywhere.
- Hostname verification against DNS names: nodes move between addresses and mDNS names are not
  owned by anyone.

Rule chosen: one certificate authority per cluster. Each node owns an EC P-256 key created on that
node (mode 0600) and a certificate signed by the CA through a CSR, so the private key never leaves
the node. The certificate's URI SAN `shardmesh://<cluster_id>/node/<node_id>` is the node's
identity. Every connection is TLS 1.3 only, with certificates required both ways. After the TLS
handshake, `peer_identity` reads the URI SAN and checks the cluster id, the expected node id and
the revocation list (certificate serials in `revoked.json`) before any frame is parsed.

Data directory layout, all under `<data_dir>/tls/` (mode 0700):
    ca.pem        cluster CA certificate (every node)
    ca.key        CA private key, mode 0600 (only on the node that holds the CA)
    node.pem      this node's certificate
    node.key      this node's private key, mode 0600
    revoked.json  {"serials": ["<hex serial>", ...]}

Rejected connections are logged once per peer address and reason at WARNING (repeats at DEBUG)
and counted in `rejection_counts`, keyed by reason.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import os
import re
import secrets
import ssl
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import AuthenticationError, CredentialsError

__all__ = [
    "NodeCredentials",
    "PeerIdentity",
    "RejectionLog",
    "classify_tls_error",
    "client_ssl_context",
    "init_cluster",
    "install_certificate",
    "issue_node",
    "load_credentials",
    "make_csr",
    "peer_identity",
    "rejection_counts",
    "rejections",
    "revoke",
    "server_ssl_context",
    "sign_csr",
]

logger = logging.getLogger(__name__)

URI_SCHEME = "shardmesh"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NODE_URI = re.compile(r"^shardmesh://([A-Za-z0-9][A-Za-z0-9._-]{0,62})/node/([A-Za-z0-9][A-Za-z0-9._-]{0,62})$")
_CLUSTER_URI = re.compile(r"^shardmesh://([A-Za-z0-9][A-Za-z0-9._-]{0,62})$")

# CA certificates live ten years: replacing one means re-issuing every node. Node certificates
# live one year, so a lost node's certificate stops working even if it is never revoked.
CA_VALIDITY = datetime.timedelta(days=3650)
NODE_VALIDITY = datetime.timedelta(days=365)
# Backdating absorbs clock skew between the CA holder and the node that first checks the cert.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeCredentials:
    """Paths and identity of this node's TLS material, loaded from a data directory."""

    node_id: str
    cluster_id: str
    data_dir: Path
    ca_path: Path
    cert_path: Path
    key_path: Path
    serial: int
    not_valid_after: datetime.datetime
    revoked: frozenset[int] = frozenset()
    holds_ca: bool = False

    def with_revoked(self, serials: frozenset[int]) -> NodeCredentials:
        """Return a copy that rejects peers whose certificate serial is in `serials`."""
        return dataclasses.replace(self, revoked=frozenset(serials))


@dataclasses.dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Identity of a peer as read from its verified certificate."""

    node_id: str
    cluster_id: str
    serial: int


# -- files ----------------------------------------------------------------------------------------


def _tls_dir(data_dir: Path | str) -> Path:
    return Path(data_dir) / "tls"


def _ensure_tls_dir(data_dir: Path | str) -> Path:
    directory = _tls_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    return directory


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` via a temporary file, fsync and rename, created with `mode`."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_PATTERN.match(value):
        raise ValueError(
            f"{kind} {value!r} is invalid: use 1 to 63 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return value


def _read_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialsError(f"private key {path} not found; run `shardmesh cluster init` or `shardmesh cert issue`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"private key {path} is readable by group or others (mode {oct(mode & 0o777)}); run chmod 600 {path}")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"private key {path} is not an EC key")
    return key


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_atomic(path, pem, 0o600)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _cluster_id_of_ca(ca_cert: x509.Certificate, path: Path) -> str:
    for uri in _uris(ca_cert):
        match = _CLUSTER_URI.match(uri)
        if match:
            return match.group(1)
    raise CredentialsError(f"CA certificate {path} has no shardmesh://<cluster_id> URI SAN")


def _node_identity_of(cert: x509.Certificate) -> tuple[str, str] | None:
    for uri in _uris(cert):
        match = _NODE_URI.match(uri)
        if match:
            return match.group(1), match.group(2)
    return None


# -- CA and issuing ---------------------------------------------------------------------------


def init_cluster(data_dir: Path | str, *, node_id: str | None = None, cluster_id: str | None = None) -> NodeCredentials:
    """Create a cluster CA and this node's key and certificate in `data_dir`.

    Raises CredentialsError if the directory already has a CA.
    """
    cluster_id = _check_id("cluster id", cluster_id or f"c-{secrets.token_hex(6)}")
    node_id = _check_id("node id", node_id or f"n-{secrets.token_hex(4)}")
    directory = _ensure_tls_dir(data_dir)
    if (directory / "ca.pem").exists():
        raise CredentialsError(f"{directory / 'ca.pem'} already exists; this data directory already belongs to a cluster")

    ca_key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"shardmesh CA {cluster_id}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shardmesh"),
        ]
    )
    now = _now()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{URI_SCHEME}://{cluster_id}")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private_key(directory / "ca.key", ca_key)
    _write_atomic(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_atomic(directory / "revoked.json", b'{"serials": []}\n', 0o644)
    logger.info("created cluster CA cluster_id=%s in %s", cluster_id, directory)

    csr = make_csr(data_dir, node_id)
    cert_pem = sign_csr(data_dir, csr, node_id=node_id)
    return install_certificate(data_dir, cert_pem, ca_cert.public_bytes(serialization.Encoding.PEM))


def make_csr(data_dir: Path | str, node_id: str) -> bytes:
    """Create this node's private key in `data_dir` (mode 0600) and return a PEM CSR for it."""
    _check_id("node id", node_id)
    directory = _ensure_tls_dir(data_dir)
    key = _new_key()
    _write_private_key(directory / "node.key", key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(
    ca_data_dir: Path | str,
    csr_pem: bytes,
    *,
    node_id: str,
    valid_for: datetime.timedelta = NODE_VALIDITY,
    not_before: datetime.datetime | None = None,
) -> bytes:
    """Sign a node CSR with the CA in `ca_data_dir` and return the PEM certificate.

    The identity SAN is set by the CA from `node_id` and the CA's cluster id; anything else the CSR
    asks for is ignored. Raises CredentialsError for a bad signature or a CN that differs from
    `node_id`.
    """
    _check_id("node id", node_id)
    directory = _tls_dir(ca_data_dir)
    ca_path = directory / "ca.pem"
    if not (directory / "ca.key").exists():
        raise CredentialsError(f"{directory / 'ca.key'} not found; sign on the node that ran `shardmesh cluster init`")
    ca_key = _read_private_key(directory / "ca.key")
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cluster_id = _cluster_id_of_ca(ca_cert, ca_path)

    csr = x509.load_pem_x509_csr(csr_pem)
    if not csr.is_signature_valid:
        raise CredentialsError("CSR signature is invalid; regenerate the CSR on the node")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != node_id:
        raise CredentialsError(f"CSR common name {[n.value for n in names]} does not match node id {node_id!r}")

    start = not_before or (_now() - _CLOCK_SKEW)
    public_key = csr.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{URI_SCHEME}://{cluster_id}/node/{node_id}")]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    logger.info("signed certificate node_id=%s cluster_id=%s serial=%x", node_id, cluster_id, cert.serial_number)
    return cert.public_bytes(serialization.Encoding.PEM)


def install_certificate(data_dir: Path | str, cert_pem: bytes, ca_pem: bytes) -> NodeCredentials:
    """Store a signed node certificate and the CA certificate next to the node key."""
    directory = _ensure_tls_dir(data_dir)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = _read_private_key(directory / "node.key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise CredentialsError(f"certificate does not match the private key in {directory / 'node.key'}")
    _write_atomic(directory / "ca.pem", ca_pem, 0o644)
    _write_atomic(directory / "node.pem", cert_pem, 0o644)
    if not (directory / "revoked.json").exists():
        _write_atomic(directory / "revoked.json", b'{"serials": []}\n', 0o644)
    return load_credentials(data_dir)


def issue_node(
    ca_data_dir: Path | str,
    target_data_dir: Path | str,
    node_id: str,
    *,
    valid_for: datetime.timedelta = NODE_VALIDITY,
    not_before: datetime.datetime | None = None,
) -> NodeCredentials:
    """Create a key in `target_data_dir`, sign its CSR with the CA in `ca_data_dir`, install both.

    For a node on another machine, run `make_csr` there, `sign_csr` on the CA holder and
    `install_certificate` back on the node; only the CSR and the certificate travel.
    """
    csr = make_csr(target_data_dir, node_id)
    cert_pem = sign_csr(ca_data_dir, csr, node_id=node_id, valid_for=valid_for, not_before=not_before)
    ca_pem = (_tls_dir(ca_data_dir) / "ca.pem").read_bytes()
    return install_certificate(target_data_dir, cert_pem, ca_pem)


def _read_revoked(path: Path) -> frozenset[int]:
    if not path.exists():
        return frozenset()
    try:
        document = json.loads(path.read_text())
        return frozenset(int(serial, 16) for serial in document["serials"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CredentialsError(f"{path} is not a valid revocation list ({exc}); expected {{\"serials\": [\"<hex>\", ...]}}") from exc


def revoke(data_dir: Path | str, serial: int) -> frozenset[int]:
    """Add a certificate serial to the revocation list in `data_dir` and return the new list."""
    path = _ensure_tls_dir(data_dir) / "revoked.json"
    serials = set(_read_revoked(path))
    serials.add(serial)
    document = {"serials": sorted(format(value, "x") for value in serials)}
    _write_atomic(path, (json.dumps(document, indent=1) + "\n").encode(), 0o644)
    logger.info("revoked certificate serial=%x in %s", serial, path)
    return frozenset(serials)


def load_credentials(data_dir: Path | str, *, tls_dir: Path | str | None = None) -> NodeCredentials:
    """Load and check this node's TLS material. Raises CredentialsError naming the bad file.

    The files are read from `<data_dir>/tls`, or from `tls_dir` when given (systemd's
    LoadCredential= puts them flat in the credentials directory).
    """
    directory = Path(tls_dir) if tls_dir is not None else _tls_dir(data_dir)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "node.pem", directory / "node.key"
    for path in (ca_path, cert_path):
        if not path.exists():
            raise CredentialsError(f"{path} not found; run `shardmesh cluster init` or `shardmesh cert issue`")
    _read_private_key(key_path)  # checks existence and mode
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise CredentialsError(f"cannot parse certificate in {directory}: {exc}") from exc
    cluster_id = _cluster_id_of_ca(ca_cert, ca_path)
    identity = _node_identity_of(cert)
    if identity is None or identity[0] != cluster_id:
        raise CredentialsError(f"{cert_path} has no shardmesh://{cluster_id}/node/<id> URI SAN")
    return NodeCredentials(
        node_id=identity[1],
        cluster_id=cluster_id,
        data_dir=Path(data_dir),
        ca_path=ca_path,
        cert_path=cert_path,
        key_path=key_path,
        serial=cert.serial_number,
        not_valid_after=cert.not_valid_after_utc,
        revoked=_read_revoked(directory / "revoked.json"),
        holds_ca=(directory / "ca.key").exists(),
    )


# -- TLS contexts and identity -------------------------------------------------------------------


def _context(creds: NodeCredentials, purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    # Identity is the URI SAN checked by peer_identity; peers have no stable DNS names.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cafile=str(creds.ca_path))
    context.load_cert_chain(str(creds.cert_path), str(creds.key_path))
    return context


def server_ssl_context(creds: NodeCredentials) -> ssl.SSLContext:
    """TLS 1.3 server context that requires a client certificate from the cluster CA."""
    context = _context(creds, ssl.PROTOCOL_TLS_SERVER)
    # Peers reconnect with a full handshake; resumption tickets would skip the client certificate.
    context.options |= ssl.OP_NO_TICKET
    return context


def client_ssl_context(creds: NodeCredentials) -> ssl.SSLContext:
    """TLS 1.3 client context that presents this node's certificate and verifies the server's."""
    return _context(creds, ssl.PROTOCOL_TLS_CLIENT)


def peer_identity(
    ssl_object: Any, creds: NodeCredentials, *, expected_node_id: str | None = None, peer: str | None = None
) -> PeerIdentity:
    """Read and check the peer's identity from its verified certificate.

    `ssl_object` is the transport's "ssl_object" extra info (ssl.SSLObject). Raises
    AuthenticationError with reason "no_certificate", "no_identity", "wrong_cluster", "revoked",
    "expired" or "wrong_node".
    """
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise AuthenticationError("peer presented no certificate", reason="no_certificate", peer=peer)
    cert = x509.load_der_x509_certificate(der)
    identity = _node_identity_of(cert)
    if identity is None:
        raise AuthenticationError("peer certificate has no shardmesh node URI SAN", reason="no_identity", peer=peer)
    cluster_id, node_id = identity
    if cluster_id != creds.cluster_id:
        raise AuthenticationError(
            f"peer node {node_id!r} belongs to cluster {cluster_id!r}, not {creds.cluster_id!r}", reason="wrong_cluster", peer=peer
        )
    if cert.serial_number in creds.revoked:
        raise AuthenticationError(
            f"peer node {node_id!r} certificate serial {cert.serial_number:x} is revoked", reason="revoked", peer=peer
        )
    if cert.not_valid_after_utc < _now():
        # OpenSSL has already checked this during the handshake; kept for contexts built elsewhere.
        raise AuthenticationError(f"peer node {node_id!r} certificate expired", reason="expired", peer=peer)
    if expected_node_id is not None and node_id != expected_node_id:
        raise AuthenticationError(
            f"peer is node {node_id!r} but {expected_node_id!r} was expected", reason="wrong_node", peer=peer
        )
    return PeerIdentity(node_id=node_id, cluster_id=cluster_id, serial=cert.serial_number)


# OpenSSL X509_V_ERR codes (include/openssl/x509_vfy.h).
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "not_yet_valid",
    10: "expired",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
}
# ssl.SSLError.reason values (OpenSSL reason strings) and the rejection reason they mean.
_SSL_REASONS = {
    "WRONG_VERSION_NUMBER": "plaintext",
    "HTTP_REQUEST": "plaintext",
    "PACKET_LENGTH_TOO_LONG": "plaintext",
    "RECORD_LAYER_FAILURE": "plaintext",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "peer_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer_rejected_certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer_rejected_certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "peer_rejected_certificate",
    "UNSUPPORTED_PROTOCOL": "tls_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "tls_version",
}


def classify_tls_error(error: BaseException) -> str:
    """Map an exception raised during the TLS handshake to a rejection reason code."""
    if isinstance(error, AuthenticationError):
        return error.reason
    if isinstance(error, TimeoutError):
        return "handshake_timeout"
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(error.verify_code, "bad_certificate")
    if isinstance(error, ssl.SSLError):
        return _SSL_REASONS.get(error.reason or "", "tls_error")
    if isinstance(error, (ConnectionError, EOFError)):
        return "connection_lost"
    return "tls_error"


class RejectionLog:
    """Counts rejected peers by reason; logs the first rejection per (address, reason) at WARNING.

    The set of seen (address, reason) pairs is bounded, so a scan from many addresses cannot grow
    memory. Once it is full, the oldest pair is forgotten and may be logged at WARNING again.
    """

    def __init__(self, max_seen: int = 1024) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._max_seen = max_seen

    def record(self, address: str, reason: str, detail: str, *, node_id: str | None = None) -> None:
        self.counts[reason] += 1
        key = (address, reason)
        first = key not in self._seen
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)
        level = logging.WARNING if first else logging.DEBUG
        logger.log(
            level, "rejected peer address=%s node_id=%s reason=%s: %s (count=%d)", address, node_id, reason, detail, self.counts[reason]
        )


rejections = RejectionLog()
rejection_counts = rejections.counts
