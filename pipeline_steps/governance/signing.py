"""Signing keys and signatures: DSSE envelopes over records, and model files signed with model-signing.

One ECDSA P-256 key pair signs; any number of trusted public keys verify, so a key rotated out of
signing still verifies what it signed. Without configured keys a per-workspace development pair is
made, and everything it signs says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline_steps.core.errors import ConfigError, RadflowError

KEY_VARIABLE = "RADFLOW_SIGNING_KEY"  # path of the PEM private key that signs
PUBLIC_KEYS_VARIABLE = "RADFLOW_SIGNING_PUBLIC_KEYS"  # os.pathsep-separated PEM public key paths
DEVELOPMENT_KEY = "workspace-development"  # the `key` mark of what the development key signs
CONFIGURED_KEY = "configured"
KEYS_FOLDER = "keys"  # under the workspace state folder (.radflow/)
DEV_PRIVATE_NAME = "development-signing-key.pem"
DEV_PUBLIC_NAME = "development-signing-key.pub.pem"
KEY_ID_LENGTH = 16
KEY_RECIPE = (
    "openssl ecparam -name prime256v1 -genkey -noout -out signing.pem && "
    "openssl ec -in signing.pem -pubout -out signing.pub.pem"
)


class SignatureError(RadflowError):
    """A signature is missing, malformed, made with an untrusted key, or does not match."""


NOT_SIGNED = "it is not signed"


@dataclass(frozen=True)
class SignatureCheck:
    """One logged model of a version against its signature: the key that signed it, or the problem."""

    model: str  # which logged model (the pyfunc `model`, the Keras copy `keras_model`)
    key_id: str
    development: bool
    problem: str = ""  # empty: verified; NOT_SIGNED: no signature and none expected


def unsigned_advice(model_name: str, version: str) -> str:
    """Why an unsigned version is not loaded, and how to sign it deliberately."""
    return (
        f"{model_name} version {version} is not signed (registered before radflow signed its "
        "models?), so it is not loaded. If you trust its files, sign them deliberately: "
        f"`radflow models sign {version} --reason '...'` (who signed and why go to the audit ledger)."
    )


@dataclass(frozen=True)
class SigningKeys:
    """The key that signs (if any) and the public keys trusted to verify; never the private key
    itself, only its path."""

    key_id: str | None  # sha256 of the signing public key's DER, hex, first 16; None: verify only
    public_pems: tuple[bytes, ...]  # trusted for verification (the signing key's own included)
    development: bool  # the per-workspace development pair, not a configured key
    private_key_path: Path | None = field(default=None, repr=False)

    @property
    def mark(self) -> str:
        """What a signature made with these keys says about its key."""
        return DEVELOPMENT_KEY if self.development else CONFIGURED_KEY

    def trusted_ids(self) -> dict[str, bytes]:
        """Trusted key ids and their PEM public keys."""
        return {key_id_of(pem): pem for pem in self.public_pems}


def _public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not an ECDSA P-256 public key")
    return key


def _normal_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id_of(public_pem: bytes) -> str:
    """The key id of a PEM public key: sha256 of its DER encoding, hex, first 16 characters."""
    der = _public_key(public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:KEY_ID_LENGTH]


def _read_private(path: Path, variable: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        # The message of a PEM parse error never holds key material; the file's name is enough.
        raise ConfigError(
            f"{variable} names {path}, which is not a readable unencrypted PEM private key "
            f"({type(exc).__name__}). Make one with `{KEY_RECIPE}`, or unset {variable} to use the "
            "workspace's development key."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"{variable} names {path}, which is not an ECDSA P-256 private key.")
    return key


def _read_public(path: Path, variable: str) -> bytes:
    try:
        return _normal_pem(_public_key(path.read_bytes()))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{variable} names {path}, which is not a readable PEM ECDSA P-256 public key "
            f"({type(exc).__name__}: {exc})."
        ) from None


def _development_pair(state_dir: Path) -> tuple[Path, bytes]:
    """The workspace's development key pair, made at first use (the private key readable by its
    owner only)."""
    folder = state_dir / KEYS_FOLDER
    private, public = folder / DEV_PRIVATE_NAME, folder / DEV_PUBLIC_NAME
    if not private.exists():
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Created 0600 in one step, then renamed, so no reader ever sees it half-written or open.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".key-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
        finally:
            os.close(fd)
        try:
            os.link(tmp, private)  # fails if another process made the key meanwhile: theirs wins
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    key = _read_private(private, f"the development key {private}")
    public_pem = _normal_pem(key.public_key())
    if not public.exists() or public.read_bytes() != public_pem:
        public.write_bytes(public_pem)
    return private, public_pem


def load_keys(state_dir: Path, env: Mapping[str, str] | None = None) -> SigningKeys:
    """The signing key and trusted public keys from RADFLOW_SIGNING_KEY and
    RADFLOW_SIGNING_PUBLIC_KEYS; with neither set, the workspace's development pair under
    `state_dir/keys/`. A configured key that cannot be read is a ConfigError naming its variable.
    With only public keys set, the keys verify but cannot sign (key_id None)."""
    environ = os.environ if env is None else env
    private_value = environ.get(KEY_VARIABLE, "").strip()
    public_value = environ.get(PUBLIC_KEYS_VARIABLE, "").strip()
    if not private_value and not public_value:
        private, public_pem = _development_pair(state_dir)
        return SigningKeys(key_id_of(public_pem), (public_pem,), True, private)
    trusted: list[bytes] = []
    key_id: str | None = None
    private_path: Path | None = None
    if private_value:
        private_path = Path(private_value).expanduser()
        own = _normal_pem(_read_private(private_path, KEY_VARIABLE).public_key())
        key_id = key_id_of(own)
        trusted.append(own)
    for part in public_value.split(os.pathsep):
        if part.strip():
            pem = _read_public(Path(part.strip()).expanduser(), PUBLIC_KEYS_VARIABLE)
            if pem not in trusted:
                trusted.append(pem)
    return SigningKeys(key_id, tuple(trusted), False, private_path)


def _private_key(keys: SigningKeys) -> ec.EllipticCurvePrivateKey:
    if keys.private_key_path is None:
        raise ConfigError(
            f"Signing needs a private key: {PUBLIC_KEYS_VARIABLE} is set but {KEY_VARIABLE} is not. "
            f"Set {KEY_VARIABLE} to the PEM private key this machine signs with."
        )
    variable = f"the development key {keys.private_key_path}" if keys.development else KEY_VARIABLE
    return _read_private(keys.private_key_path, variable)


def check_can_sign(keys: SigningKeys) -> None:
    """A ConfigError naming the variable when these keys cannot sign (verify-only, or unreadable)."""
    _private_key(keys)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1's pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def sign_payload(keys: SigningKeys, payload: bytes, payload_type: str) -> dict[str, Any]:
    """A DSSE envelope over `payload`, signed with the signing key; `key` marks a development
    signature as `workspace-development`."""
    signature = _private_key(keys).sign(pae(payload_type, payload), ec.ECDSA(hashes.SHA256()))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [{"keyid": keys.key_id, "sig": base64.b64encode(signature).decode()}],
        "key": keys.mark,
    }


def _trusted(keys_or_public_pems: SigningKeys | Iterable[bytes | str]) -> dict[str, bytes]:
    if isinstance(keys_or_public_pems, SigningKeys):
        return keys_or_public_pems.trusted_ids()
    pems = [p.encode() if isinstance(p, str) else p for p in keys_or_public_pems]
    return {key_id_of(pem): pem for pem in pems}


def verify_envelope(
    envelope: Mapping[str, Any],
    keys_or_public_pems: SigningKeys | Iterable[bytes | str],
    *,
    payload_type: str | None = None,
) -> bytes:
    """The payload of a DSSE envelope when one of its signatures verifies with a trusted key;
    otherwise a SignatureError saying why (malformed, no signature, unknown key, bad signature,
    or another payload type than `payload_type` when given)."""
    trusted = _trusted(keys_or_public_pems)
    try:
        kind = envelope["payloadType"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        signatures = list(envelope.get("signatures") or [])
        if not isinstance(kind, str) or not all(isinstance(s, Mapping) for s in signatures):
            raise TypeError("payloadType must be a string and signatures objects")
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise SignatureError(
            f"Malformed signature envelope ({type(exc).__name__}: {exc})."
        ) from None
    if payload_type is not None and kind != payload_type:
        raise SignatureError(f"The envelope holds a {kind!r}, not a {payload_type!r}.")
    if not signatures:
        raise SignatureError("The envelope carries no signature.")
    message = pae(kind, payload)
    unknown: list[str] = []
    for entry in signatures:
        keyid = str(entry.get("keyid") or "")
        candidates = (
            [trusted[keyid]] if keyid in trusted else ([] if keyid else list(trusted.values()))
        )
        if not candidates:
            unknown.append(keyid)
            continue
        try:
            sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
        except (ValueError, binascii.Error):
            raise SignatureError(
                f"Malformed signature envelope: key {keyid}'s sig is not base64."
            ) from None
        for pem in candidates:
            try:
                _public_key(pem).verify(sig, message, ec.ECDSA(hashes.SHA256()))
                return payload
            except InvalidSignature:
                continue
        raise SignatureError(
            f"Bad signature: key {keyid or '(unnamed)'} is trusted but its signature does not match "
            "the payload (the record was changed after signing, or signed by another key)."
        )
    raise SignatureError(
        f"Unknown key: the envelope is signed by {', '.join(unknown)}, which is not among the trusted "
        f"keys ({', '.join(sorted(trusted)) or 'none'}). Add its public key to {PUBLIC_KEYS_VARIABLE} "
        "if it is yours."
    )


def envelope_key_ids(envelope: Mapping[str, Any]) -> list[str]:
    """The key ids an envelope says it is signed by (unverified)."""
    return [
        str(s.get("keyid") or "")
        for s in envelope.get("signatures") or []
        if isinstance(s, Mapping)
    ]


# ------------------------------------------------------------------------------------------------
# Model files, through model-signing (an in-toto statement of every file's sha256, in a Sigstore
# bundle signed with the elliptic key; no network)


def _hashing_config() -> Any:
    from model_signing import hashing

    # Every file counts: model-signing skips .git* files by default, which a model folder has no
    # reason to hold and an attacker could add unnoticed.
    return hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)


def sign_model(keys: SigningKeys, model_dir: Path, signature_path: Path) -> str:
    """Signs every file under `model_dir` into `signature_path` (outside it); returns the key id."""
    from model_signing import signing as model_signing

    if not model_dir.is_dir():
        raise SignatureError(f"Cannot sign {model_dir}: it is not a folder.")
    _private_key(keys)  # a clear ConfigError before model-signing's own
    assert keys.private_key_path is not None and keys.key_id is not None
    config = model_signing.Config().set_hashing_config(_hashing_config())
    config.use_elliptic_key_signer(private_key=keys.private_key_path).sign(
        model_dir, signature_path
    )
    return keys.key_id


def _bundle_key_hint(signature_path: Path) -> str:
    try:
        bundle = json.loads(signature_path.read_text(encoding="utf-8"))
        hint = bundle["verificationMaterial"].get("publicKey", {}).get("hint")
    except FileNotFoundError:
        raise SignatureError(f"No signature: {signature_path.name} is missing.") from None
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise SignatureError(
            f"Malformed model signature {signature_path.name} ({type(exc).__name__})."
        ) from None
    return str(hint or "")


def verify_model(keys: SigningKeys, model_dir: Path, signature_path: Path) -> str:
    """Checks that the files under `model_dir` are exactly those signed in `signature_path` by a
    trusted key; returns that key's id, else raises SignatureError naming what failed (a file
    changed, added or missing; an unknown key; a bad signature)."""
    from model_signing import verifying

    hint = _bundle_key_hint(signature_path)
    # model-signing names the key by the sha256 of its PEM; radflow by its DER (key_id_of).
    by_hint = {hashlib.sha256(pem).hexdigest(): pem for pem in keys.public_pems}
    candidates = [by_hint[hint]] if hint in by_hint else ([] if hint else list(keys.public_pems))
    if not candidates:
        raise SignatureError(
            f"Unknown key: the model is signed by a key that is not trusted (public key sha256 "
            f"{hint[:16]}...; trusted: {', '.join(key_id_of(p) for p in keys.public_pems) or 'none'}). "
            f"Add its public key to {PUBLIC_KEYS_VARIABLE} if it is yours."
        )
    failure = ""
    for pem in candidates:
        with tempfile.TemporaryDirectory(prefix="radflow-pub-") as scratch:
            public_path = Path(scratch) / "key.pub.pem"
            public_path.write_bytes(pem)
            config = verifying.Config().set_hashing_config(_hashing_config())
            try:
                config.use_elliptic_key_verifier(public_key=public_path).verify(
                    model_dir, signature_path
                )
                return key_id_of(pem)
            except InvalidSignature:
                failure = "bad signature: the signed manifest does not match its signature"
            except (ValueError, KeyError, TypeError) as exc:
                failure = _describe(str(exc))
    raise SignatureError(f"{failure}.")


def _names(match: re.Match[str] | None) -> list[str]:
    return [n.strip() for n in match.group(1).split(",") if n.strip()] if match else []


def _describe(message: str) -> str:
    """model-signing's verification error, in radflow's words where it is a known one."""
    if message.startswith("Signature mismatch:"):
        # model-signing's detail is a list's repr with each digest's bytes: keep the file names.
        q = r"\\?'"
        found = {
            "changed": re.findall(rf"Hash mismatch for {q}(.+?){q}:", message),
            "added": _names(
                re.search(rf"Extra files found in model {q}.*?{q}: ([^\"'\]]+)", message)
            ),
            "missing": _names(
                re.search(rf"Missing files in model {q}.*?{q}: ([^\"'\]]+)", message)
            ),
        }
        said = "; ".join(f"{kind} {', '.join(names)}" for kind, names in found.items() if names)
        return f"the files differ from those signed ({said or message})"
    if message.startswith("Key mismatch"):
        return "signed by another key than the trusted one"
    return f"the signature does not verify ({message})"
