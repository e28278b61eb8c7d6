"""Store on a local folder and on a real S3 endpoint (moto on 127.0.0.1): round trips, key safety, failures."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from infra.settings import Settings, job_env, s3_credential_source
from infra.storage import StorageError, Store, content_hash, content_key
from poison_core.config import ThreatModel
from poison_core.errors import BelladonnaError, ConfigError, DatasetError, InputError
from poison_core.poisons import PoisonSet, to_parquet_bytes
from tests.helpers import tiny_dataset
from tests.s3server import bucket_env, s3_server

TRAIN = tiny_dataset(n=64)
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "BELLADONNA_S3_ENDPOINT", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL_STS",
            "AWS_EC2_METADATA_DISABLED")


def small_poison_set() -> PoisonSet:
    pos = np.array([1, 5, 9])
    images = np.clip(TRAIN.images[pos].astype(int) + 3, 0, 255).astype(np.uint8)
    labels = TRAIN.labels[pos]
    return PoisonSet(ids=TRAIN.ids[pos], images=images, orig_labels=labels,
                     poison_labels=(labels + 1) % TRAIN.num_classes,
                     threat=ThreatModel(epsilon=8, budget=0.1), n_train=len(TRAIN),
                     targets={"ids": [7]}, provenance={"attack": "test", "dataset_checksum": TRAIN.checksum()})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def exercise(store: Store) -> None:
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"\x00payload")
    store.write_bytes("a/c=1/d.bin", b"more")
    store.write_bytes("top.txt", b"t")
    assert store.exists("a/b.bin")
    assert store.read_bytes("a/b.bin") == b"\x00payload"
    assert store.list("a") == ["a/b.bin", "a/c=1/d.bin"]
    assert store.list() == ["a/b.bin", "a/c=1/d.bin", "top.txt"]
    assert store.list("nothing-here") == []
    store.delete("a/b.bin")
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    with pytest.raises(DatasetError, match="does not exist"):
        store.read_bytes("a/b.bin")


def test_local_store_round_trip(tmp_path):
    store = Store(str(tmp_path / "store"), Settings())
    exercise(store)
    assert store.storage_options == {}
    assert store.uri("x", "y.bin") == f"{tmp_path / 'store'}/x/y.bin"
    assert not [p for p in (tmp_path / "store").rglob("*") if ".tmp-" in p.name]


def test_local_store_reads_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BELLADONNA_STORE", str(tmp_path / "envstore"))
    assert Store().root == str(tmp_path / "envstore")


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "", "a//b", "a\\b", "./x", "x/",
                                 "a b", "ä", "a/..", "C:\\x"])
def test_keys_that_could_escape_the_store_are_rejected(tmp_path, key):
    store = Store(str(tmp_path), Settings())
    with pytest.raises(InputError, match="store key"):
        store.uri(key)
    with pytest.raises(InputError):
        store.write_bytes(key, b"x")
    assert list(tmp_path.iterdir()) == []


def test_content_key_is_stable_and_canonical():
    a = content_key("poisons", payload={"attack": "badnets", "eps": 8, "seed": [1, 2]}, suffix=".parquet")
    b = content_key("poisons", payload={"seed": [1, 2], "eps": 8, "attack": "badnets"}, suffix=".parquet")
    assert a == b and a.startswith("poisons/") and a.endswith(".parquet")
    digest = a.split("/")[1].removesuffix(".parquet")
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert content_hash({"eps": 8}) != content_hash({"eps": 9})
    assert Store.content_key("x", payload={"eps": 8}) == f"x/{content_hash({'eps': 8})}"
    with pytest.raises(InputError, match="canonical JSON"):
        content_hash({"x": float("nan")})
    with pytest.raises(InputError, match="canonical JSON"):
        content_hash({"x": object()})


def test_settings_from_env_keeps_secrets_out_of_repr(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecret123")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.delenv("BELLADONNA_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = Settings.from_env()
    assert settings.s3_endpoint == "http://127.0.0.1:9000" and settings.has_credentials
    assert "supersecret123" not in repr(settings) + str(settings) + repr(Store("s3://bucket/p", settings))
    monkeypatch.setenv("BELLADONNA_S3_RETRIES", "99")
    with pytest.raises(ConfigError, match="BELLADONNA_S3_RETRIES"):
        Settings.from_env()


def test_default_tracking_uri_is_sqlite_in_the_run_folder(tmp_path):
    settings = Settings.from_env({"BELLADONNA_RUN_DIR": str(tmp_path)})
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert Settings.from_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).tracking_uri == "http://mlflow:5000"


def test_s3_storage_options_bound_retries_and_timeouts():
    settings = Settings(aws_access_key_id="k", aws_secret_access_key="s", s3_endpoint="http://127.0.0.1:9000",
                        s3_retries=1, s3_connect_timeout=2)
    options = Store("s3://bucket/prefix/", settings).storage_options
    assert options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert options["config_kwargs"]["retries"] == {"max_attempts": 1, "mode": "standard"}
    assert options["config_kwargs"]["connect_timeout"] == 2
    assert (options["key"], options["secret"]) == ("k", "s") and "token" not in options


def test_s3_store_round_trip(s3_store):
    exercise(s3_store)
    assert s3_store.uri("k.bin").startswith("s3://")


def test_poison_set_round_trips_through_s3_byte_identically(s3_store):
    poison_set = small_poison_set()
    key = s3_store.content_key("poisons", payload={"attack": "test", "seed": 0}, suffix=".parquet")
    s3_store.write_poison_set(key, poison_set, TRAIN)
    keyed = replace(poison_set, provenance={**poison_set.provenance, "store_key": key})
    assert s3_store.read_bytes(key) == to_parquet_bytes(keyed)
    back = s3_store.read_poison_set(key, TRAIN, poison_set.threat)
    assert to_parquet_bytes(back) == to_parquet_bytes(keyed)
    np.testing.assert_array_equal(back.images, poison_set.images)
    assert back.targets == {"ids": [7]} and back.provenance["attack"] == "test"
    assert s3_store.list("poisons") == [key]


def chain_env(tmp_path, **extra: str) -> dict[str, str]:
    """An environment in which botocore's chain sees only what a test gives it: no keys, shared files in
    `tmp_path` (absent unless written), no instance metadata service."""
    return {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_CONFIG_FILE": str(tmp_path / "config"),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1", **extra}


def test_s3_without_any_credential_is_one_line_at_start(monkeypatch, tmp_path):
    use_env(monkeypatch, chain_env(tmp_path))
    with pytest.raises(InputError, match=r"s3 store 's3://bucket/x' needs credentials and botocore's credential "
                                         r"chain found none: set AWS_ACCESS_KEY_ID .* AWS_PROFILE") as info:
        Store("s3://bucket/x")
    assert "\n" not in str(info.value)


def test_s3_store_uses_a_shared_credentials_file_profile(moto_endpoint, monkeypatch, tmp_path):
    (tmp_path / "credentials").write_text("[bd-test]\naws_access_key_id = testing\naws_secret_access_key = "
                                          "Zq9-profile-secret\n")
    bucket = moto_endpoint.create_bucket()
    use_env(monkeypatch, chain_env(tmp_path, AWS_PROFILE="bd-test", BELLADONNA_S3_ENDPOINT=moto_endpoint.endpoint))
    store = Store(f"s3://{bucket}/store")
    assert s3_credential_source(store.settings, store.root) == "shared-credentials-file"
    assert store.storage_options["profile"] == "bd-test" and store.storage_options["key"] is None
    exercise(store)
    assert "Zq9-profile-secret" not in repr(store) + repr(store.settings)


def test_s3_store_uses_web_identity_credentials(moto_endpoint, monkeypatch, tmp_path):
    """IRSA's variables: botocore exchanges the token file for a role's credentials (moto's STS)."""
    (tmp_path / "token").write_text("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJiZCJ9.c2ln")
    bucket = moto_endpoint.create_bucket()
    use_env(monkeypatch, chain_env(tmp_path, AWS_ROLE_ARN="arn:aws:iam::123456789012:role/belladonna",
                                   AWS_WEB_IDENTITY_TOKEN_FILE=str(tmp_path / "token"),
                                   AWS_ENDPOINT_URL_STS=moto_endpoint.endpoint,
                                   BELLADONNA_S3_ENDPOINT=moto_endpoint.endpoint))
    store = Store(f"s3://{bucket}/store")
    assert s3_credential_source(store.settings, store.root) == "assume-role-with-web-identity"
    exercise(store)


@pytest.mark.parametrize("env, expected", [
    ({"AWS_PROFILE": "nobody"}, r"AWS_PROFILE 'nobody' is not a profile of .*credentials or .*config"),
    ({"AWS_ACCESS_KEY_ID": "AKIDONLY"}, r"AWS credentials: PartialCredentialsError: .*AWS_SECRET_ACCESS_KEY"),
])
def test_misconfigured_credential_chain_is_one_line(monkeypatch, tmp_path, env, expected):
    use_env(monkeypatch, chain_env(tmp_path, **env))
    with pytest.raises(InputError, match=expected) as info:
        Store("s3://bucket/x")
    assert "\n" not in str(info.value) and "AKIDONLY" not in str(info.value)


def test_wrong_credentials_are_one_line_at_the_bucket_check(moto_endpoint, monkeypatch):
    """A key the endpoint does not know (moto checking IAM) is refused by the start-up check of the bucket."""
    from moto.core.authorization import enable_iam_authentication

    bucket = moto_endpoint.create_bucket()
    use_env(monkeypatch, {**bucket_env(moto_endpoint.endpoint, bucket), "AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"})
    with enable_iam_authentication(), pytest.raises(StorageError, match=rf"access to bucket '{bucket}' denied") as info:
        Store().check_writable()
    assert "\n" not in str(info.value) and "AKIAUNKNOWNKEY000000" not in str(info.value)


def test_job_env_hands_on_the_store_tracking_and_credential_chain_only():
    env = {"BELLADONNA_STORE": "s3://b/p", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_PROFILE": "p",
           "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token", "AWS_ENDPOINT_URL_S3": "http://s3:9000",
           "AWS_SECRET_ACCESS_KEY": "s", "HOME": "/root", "PREFECT_API_URL": "http://p/api", "BELLADONNA_EMPTY": ""}
    assert job_env(env) == {k: env[k] for k in ("BELLADONNA_STORE", "MLFLOW_TRACKING_URI", "AWS_PROFILE",
                                                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL_S3",
                                                 "AWS_SECRET_ACCESS_KEY")}


def test_wrong_port_is_a_storage_error(monkeypatch):
    use_env(monkeypatch, bucket_env(f"http://127.0.0.1:{free_port()}", "nobody-home"))
    store = Store()
    with pytest.raises(StorageError, match=r"cannot check 's3://nobody-home/store/k': .*connect") as info:
        store.exists("k")
    assert not isinstance(info.value, InputError) and isinstance(info.value, BelladonnaError)
    assert "\n" not in str(info.value)


def test_stopped_server_is_a_storage_error(monkeypatch):
    with s3_server() as s3:
        use_env(monkeypatch, s3.env)
        store = Store()
        store.write_bytes("k.bin", b"1")
        s3.endpoint.stop()
        with pytest.raises(StorageError, match=r"cannot read 's3://.*/store/k.bin'"):
            store.read_bytes("k.bin")
        with pytest.raises(StorageError, match=r"cannot write"):
            Store().write_bytes("k2.bin", b"2")


def test_missing_bucket_is_a_storage_error(s3_env):
    store = Store("s3://no-such-bucket-here/p")
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' does not exist"):
        store.exists("k")
    with pytest.raises(StorageError, match="does not exist"):
        store.write_bytes("k", b"x")


def test_endpoint_that_never_answers_is_a_storage_error_after_bounded_retries(monkeypatch):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = bucket_env(f"http://127.0.0.1:{silent.getsockname()[1]}", "silent-bucket")
        use_env(monkeypatch, {**env, "BELLADONNA_S3_READ_TIMEOUT": "0.5", "BELLADONNA_S3_RETRIES": "1"})
        with pytest.raises(StorageError, match="ReadTimeoutError"):
            Store().exists("k")


def test_sweep_removes_temp_files_of_killed_writers_only(tmp_path):
    """A writer SIGKILLed between writing its temporary file and the rename leaves it behind; the sweep
    removes it, and never the temporary file of a live writer or one written on another host."""
    import signal
    import subprocess
    import sys

    from poison_core import io as core_io

    store = Store(str(tmp_path / "store"), Settings())
    store.write_bytes("cells/kept.json", b"{}")
    folder = tmp_path / "store" / "cells"
    script = ("import sys, time; from poison_core.io import tmp_name; "
              "open(tmp_name(sys.argv[1]), 'wb').write(b'half'); print('ready', flush=True); time.sleep(60)")
    writer = subprocess.Popen([sys.executable, "-c", script, str(folder / "x.json")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        live = core_io.tmp_name(str(folder / "y.json"))  # this process: alive
        Path(live).write_bytes(b"in flight")
        foreign = folder / ".z.json.tmp-00000000-1-abc"  # another host's writer: not ours to judge
        foreign.write_bytes(b"?")
        assert store.sweep_orphans() == []  # every writer still runs (or is not on this host)
        assert store.list("cells") == ["cells/kept.json"]  # temporary files are never keys
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        removed = store.sweep_orphans()
        assert len(removed) == 1 and Path(removed[0]).name.startswith(".x.json.tmp-")
        assert Path(live).exists() and foreign.exists()
        assert store.sweep_orphans(writers_gone={os.getpid()}) == [live]  # the caller is about to exit
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert store.read_bytes("cells/kept.json") == b"{}"
