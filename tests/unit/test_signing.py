import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline_steps.core.errors import ConfigError
from pipeline_steps.governance.signing import (
    DEVELOPMENT_KEY,
    KEY_VARIABLE,
    PUBLIC_KEYS_VARIABLE,
    SignatureError,
    load_keys,
    sign_model,
    sign_payload,
    verify_envelope,
    verify_model,
)

KIND = "application/vnd.radflow.test+json"


def make_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A P-256 key pair as PEM files, as `openssl ecparam` would make them."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def configured(private: Path | None, *public: Path) -> dict[str, str]:
    env = {}
    if private is not None:
        env[KEY_VARIABLE] = str(private)
    if public:
        env[PUBLIC_KEYS_VARIABLE] = os.pathsep.join(str(p) for p in public)
    return env


def model_folder(root: Path) -> Path:
    model = root / "model"
    (model / "data").mkdir(parents=True)
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "data" / "model.keras").write_bytes(bytes(range(256)) * 8)
    return model


# --------------------------------------------------------------------------------------------
# Envelopes


def test_envelope_round_trip_gives_back_the_payload(tmp_path):
    private, _ = make_pair(tmp_path / "k", "a")
    keys = load_keys(tmp_path / "state", configured(private))
    envelope = sign_payload(keys, b'{"decision": "promote"}', KIND)
    # JSON-able, and the PAE of DSSE v1 is what the signature covers.
    envelope = json.loads(json.dumps(envelope))
    assert envelope["payloadType"] == KIND
    assert envelope["signatures"][0]["keyid"] == keys.key_id
    assert envelope["key"] == "configured"
    assert verify_envelope(envelope, keys) == b'{"decision": "promote"}'
    assert verify_envelope(envelope, keys, payload_type=KIND) == b'{"decision": "promote"}'
    assert verify_envelope(envelope, keys.public_pems) == b'{"decision": "promote"}'
    with pytest.raises(SignatureError, match="not a"):
        verify_envelope(envelope, keys, payload_type="application/other")


def test_key_id_is_the_sha256_of_the_public_key_der(tmp_path):
    private, public = make_pair(tmp_path / "k", "a")
    keys = load_keys(tmp_path / "state", configured(private))
    der = serialization.load_pem_public_key(public.read_bytes()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert keys.key_id == hashlib.sha256(der).hexdigest()[:16]
    assert not keys.development


def test_tampered_payload_is_a_bad_signature(tmp_path):
    private, _ = make_pair(tmp_path / "k", "a")
    keys = load_keys(tmp_path / "state", configured(private))
    envelope = sign_payload(keys, b'{"decision": "reject"}', KIND)
    import base64

    envelope["payload"] = base64.b64encode(b'{"decision": "promote"}').decode()
    with pytest.raises(SignatureError, match="Bad signature"):
        verify_envelope(envelope, keys)
    # The type is signed too.
    envelope = sign_payload(keys, b"{}", KIND)
    envelope["payloadType"] = "application/vnd.radflow.other+json"
    with pytest.raises(SignatureError, match="Bad signature"):
        verify_envelope(envelope, keys)


def test_unknown_key_missing_signature_and_malformed_envelopes_are_refused(tmp_path):
    a, _ = make_pair(tmp_path / "k", "a")
    b, _ = make_pair(tmp_path / "k", "b")
    keys_a = load_keys(tmp_path / "state", configured(a))
    keys_b = load_keys(tmp_path / "state", configured(b))
    envelope = sign_payload(keys_a, b"x", KIND)
    with pytest.raises(SignatureError, match=f"Unknown key.*{keys_a.key_id}"):
        verify_envelope(envelope, keys_b)
    with pytest.raises(SignatureError, match="no signature"):
        verify_envelope({**envelope, "signatures": []}, keys_a)
    with pytest.raises(SignatureError, match="Malformed"):
        verify_envelope({"payloadType": KIND}, keys_a)
    with pytest.raises(SignatureError, match="Malformed"):
        verify_envelope({**envelope, "payload": "not base64!"}, keys_a)


def test_rotated_key_still_verifies_what_it_signed(tmp_path):
    old, old_pub = make_pair(tmp_path / "k", "old")
    new, new_pub = make_pair(tmp_path / "k", "new")
    before = load_keys(tmp_path / "state", configured(old))
    envelope = sign_payload(before, b"signed before rotation", KIND)
    model = model_folder(tmp_path)
    sign_model(before, model, tmp_path / "model.sig")

    after = load_keys(tmp_path / "state", configured(new, old_pub, new_pub))
    assert after.key_id != before.key_id
    assert verify_envelope(envelope, after) == b"signed before rotation"
    assert verify_model(after, model, tmp_path / "model.sig") == before.key_id
    assert verify_envelope(sign_payload(after, b"new", KIND), after) == b"new"

    retired = load_keys(tmp_path / "state", configured(new, new_pub))
    with pytest.raises(SignatureError, match="Unknown key"):
        verify_envelope(envelope, retired)
    with pytest.raises(SignatureError, match="Unknown key"):
        verify_model(retired, model, tmp_path / "model.sig")


def test_verify_only_keys_cannot_sign(tmp_path):
    _, public = make_pair(tmp_path / "k", "a")
    keys = load_keys(tmp_path / "state", configured(None, public))
    assert keys.key_id is None and not keys.development and len(keys.public_pems) == 1
    with pytest.raises(ConfigError, match=KEY_VARIABLE):
        sign_payload(keys, b"x", KIND)
    # The development key is not made, nor trusted, once keys are configured.
    assert not (tmp_path / "state" / "keys").exists()


# --------------------------------------------------------------------------------------------
# Configuration fails closed


def test_missing_or_unreadable_key_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=KEY_VARIABLE):
        load_keys(tmp_path / "state", {KEY_VARIABLE: str(tmp_path / "absent.pem")})
    with pytest.raises(ConfigError, match=PUBLIC_KEYS_VARIABLE):
        load_keys(tmp_path / "state", {PUBLIC_KEYS_VARIABLE: str(tmp_path / "absent.pub.pem")})
    # A public key where the private one belongs: refused, and nothing of the file is echoed.
    _, public = make_pair(tmp_path / "k", "a")
    with pytest.raises(ConfigError, match=KEY_VARIABLE) as caught:
        load_keys(tmp_path / "state", {KEY_VARIABLE: str(public)})
    assert "BEGIN" not in str(caught.value)
    # Another curve than P-256.
    other = ec.generate_private_key(ec.SECP384R1())
    p384 = tmp_path / "k" / "p384.pem"
    p384.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="P-256"):
        load_keys(tmp_path / "state", {KEY_VARIABLE: str(p384)})
    assert not (tmp_path / "state").exists()


def test_development_key_is_made_once_private_and_marked(tmp_path):
    state = tmp_path / ".radflow"
    keys = load_keys(state, {})
    assert keys.development and keys.key_id
    private = state / "keys" / "development-signing-key.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_keys(state, {}).key_id == keys.key_id  # the same pair next time
    envelope = sign_payload(keys, b"dev", KIND)
    assert envelope["key"] == DEVELOPMENT_KEY == "workspace-development"
    assert verify_envelope(envelope, keys) == b"dev"
    # Another workspace's development key is another key.
    assert load_keys(tmp_path / "other", {}).key_id != keys.key_id
    # A deployment with its own keys does not trust the development key.
    mine, _ = make_pair(tmp_path / "k", "mine")
    with pytest.raises(SignatureError, match="Unknown key"):
        verify_envelope(envelope, load_keys(state, configured(mine)))


# --------------------------------------------------------------------------------------------
# Model files


def test_model_signature_round_trip_and_tampering(tmp_path):
    keys = load_keys(tmp_path / "state", {})
    model = model_folder(tmp_path)
    signature = tmp_path / "model.sig"
    assert sign_model(keys, model, signature) == keys.key_id
    assert verify_model(keys, model, signature) == keys.key_id

    weights = model / "data" / "model.keras"
    original = weights.read_bytes()
    weights.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(SignatureError, match=r"differ.*changed data/model\.keras") as caught:
        verify_model(keys, model, signature)
    assert "Digest" not in str(caught.value)  # the file names, not the digests' bytes
    weights.write_bytes(original)
    verify_model(keys, model, signature)

    (model / "extra.py").write_text("import os\n")
    with pytest.raises(SignatureError, match=r"differ.*added extra\.py"):
        verify_model(keys, model, signature)
    (model / "extra.py").unlink()
    (model / ".gitattributes").write_text("* binary\n")  # model-signing's default would skip it
    with pytest.raises(SignatureError, match=r"\.gitattributes"):
        verify_model(keys, model, signature)
    (model / ".gitattributes").unlink()

    (model / "MLmodel").unlink()
    with pytest.raises(SignatureError, match=r"differ.*missing MLmodel"):
        verify_model(keys, model, signature)


def test_model_without_signature_or_with_a_forged_one_is_refused(tmp_path):
    keys = load_keys(tmp_path / "state", {})
    model = model_folder(tmp_path)
    with pytest.raises(SignatureError, match="No signature"):
        verify_model(keys, model, tmp_path / "absent.sig")
    (tmp_path / "garbage.sig").write_text("not json")
    with pytest.raises(SignatureError, match="Malformed"):
        verify_model(keys, model, tmp_path / "garbage.sig")

    # A signature whose hint names the trusted key but whose signature is another key's.
    signature = tmp_path / "model.sig"
    sign_model(keys, model, signature)
    stranger, _ = make_pair(tmp_path / "k", "stranger")
    forged = tmp_path / "forged.sig"
    sign_model(load_keys(tmp_path / "s2", configured(stranger)), model, forged)
    bundle = json.loads(forged.read_text())
    bundle["verificationMaterial"] = json.loads(signature.read_text())["verificationMaterial"]
    forged.write_text(json.dumps(bundle))
    with pytest.raises(SignatureError):
        verify_model(keys, model, forged)
