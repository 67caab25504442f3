"""Upstream credentials: basic auth, passwordFromEnv, static tokens, helpers.

Basic auth and the credential helper are proven against a real
docker-registry with htpasswd; bearer tokens against the fake upstream,
since docker-registry cannot take a static token.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from support.images import make_image
from support.processes import wait_until

IMAGE = make_image("credentials", layer_sizes=(4096,))
REPO = "cred/app"
USER = "puller"
PASSWORD = "pw-basic-7f3a91"
ENV_PASSWORD = "pw-env-91c2e4"
HELPER_SECRET = "pw-helper-d00d55"
STATIC_TOKEN = "static-token-55aa0b"
PASSWORD_VARIABLE = "OCIREGISTRY_TEST_UPSTREAM_PASSWORD"

HELPER_SCRIPT = """#!/bin/sh
# A Docker credential helper: the registry host on stdin, a login out.
read -r host || true
echo "$host" >> {calls}
printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{secret}"}}' "$host"
"""


def htpasswd_upstream(factory, password: str = PASSWORD):
    """Start a docker-registry that wants USER/password, holding IMAGE."""
    return factory({f"{REPO}:1": IMAGE}, htpasswd={USER: password})


def entry(upstream, **auth: object) -> dict[str, object]:
    """Return a `registries` entry for an upstream with these auth keys."""
    return {"name": upstream.namespace, "scheme": "http", "auth": auth}


def get(server, path: str):
    return server.client().request("GET", server.url + path)


def pull_image(server, namespace: str) -> None:
    """Pull IMAGE's manifest and blobs through our server, checking each."""
    manifest = get(server, f"/v2/{namespace}/{REPO}/manifests/1")
    assert manifest.status == 200, manifest.data
    assert manifest.data == IMAGE.bytes
    for blob in IMAGE.blobs:
        response = get(server, f"/v2/{namespace}/{REPO}/blobs/{blob.digest}")
        assert response.status == 200, response.data
        assert "sha256:" + hashlib.sha256(response.data).hexdigest() == blob.digest


def install_helper(directory: Path, name: str, secret: str = HELPER_SECRET) -> Path:
    """Write `docker-credential-<name>`; return the file each call is logged to."""
    calls = directory / f"{name}-calls.txt"
    script = directory / f"docker-credential-{name}"
    script.write_text(HELPER_SCRIPT.format(calls=calls, user=USER, secret=secret))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return calls


def helper_env(directory: Path) -> dict[str, str]:
    """Return the server environment that finds helpers in `directory`."""
    return {"PATH": f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"}


def helper_calls(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_basic_auth_against_htpasswd_registry_pulls_the_image(
    registry_upstream_factory, oci_server
):
    upstream = htpasswd_upstream(registry_upstream_factory)
    config = {"registries": [entry(upstream, user=USER, password=PASSWORD)]}
    server = oci_server(config=config)

    pull_image(server, upstream.namespace)

    manifest_path = upstream.manifest_path(REPO, "1")
    statuses = [line.status for line in upstream.access_lines()]
    assert upstream.count_requests(manifest_path) >= 1
    assert 200 in statuses


def test_htpasswd_registry_without_credentials_is_502_naming_it(
    registry_upstream_factory, oci_server
):
    upstream = htpasswd_upstream(registry_upstream_factory)
    server = oci_server(config={"registries": [entry(upstream)]})

    response = get(server, f"/v2/{upstream.namespace}/{REPO}/manifests/1")

    assert response.status == 502
    assert upstream.namespace in response.json()["errors"][0]["message"]


def test_wrong_password_is_502_naming_the_upstream(
    registry_upstream_factory, oci_server
):
    upstream = htpasswd_upstream(registry_upstream_factory)
    auth = {"user": USER, "password": "not-the-password"}
    server = oci_server(config={"registries": [entry(upstream, **auth)]})

    response = get(server, f"/v2/{upstream.namespace}/{REPO}/manifests/1")

    assert response.status == 502
    message = response.json()["errors"][0]["message"]
    assert upstream.namespace in message
    assert "not-the-password" not in message


def test_password_from_env_is_read_from_the_server_environment(
    registry_upstream_factory, oci_server
):
    upstream = htpasswd_upstream(registry_upstream_factory, ENV_PASSWORD)
    auth = {"user": USER, "passwordFromEnv": PASSWORD_VARIABLE}
    server = oci_server(
        config={"registries": [entry(upstream, **auth)]},
        env={PASSWORD_VARIABLE: ENV_PASSWORD},
    )

    pull_image(server, upstream.namespace)

    assert ENV_PASSWORD not in server.config_path.read_text()


def test_star_entry_credentials_apply_to_an_unconfigured_upstream(
    registry_upstream_factory, oci_server
):
    upstream = htpasswd_upstream(registry_upstream_factory)
    star = {"name": "*", "scheme": "http", "auth": {"user": USER, "password": PASSWORD}}
    server = oci_server(config={"registries": [star]})

    pull_image(server, upstream.namespace)


def test_static_token_is_sent_without_a_token_exchange(fake_upstream, oci_server):
    fake = fake_upstream(auth="bearer")
    fake.add_image(REPO, "1", IMAGE)
    fake.tokens[STATIC_TOKEN] = (f"repository:{REPO}:pull", time.monotonic() + 600)
    auth = {"token": {"static": STATIC_TOKEN}}
    server = oci_server(config={"registries": [fake.registry_config(auth=auth)]})

    pull_image(server, fake.namespace)

    assert fake.count("/token") == 0
    content = [r for r in fake.requests() if r.path.startswith(f"/v2/{REPO}/")]
    assert content
    assert all(
        r.headers.get("authorization") == f"Bearer {STATIC_TOKEN}" for r in content
    )


def test_credential_helper_login_is_used_and_rerun_after_expiry(
    registry_upstream_factory, oci_server, tmp_path
):
    upstream = htpasswd_upstream(registry_upstream_factory, HELPER_SECRET)
    calls = install_helper(tmp_path, "test")
    expiry = 1.0
    token = {"provider": "helper", "providerOpts": "name=test", "expiry": "1s"}
    server = oci_server(
        config={"registries": [entry(upstream, token=token)]},
        env=helper_env(tmp_path),
    )

    pull_image(server, upstream.namespace)
    first_calls = helper_calls(calls)
    first_pull = time.monotonic()

    # Each tags/list of a new repository goes to the upstream, which asks
    # for the login again; past the expiry that runs the helper anew.
    probes = iter(range(1000))

    def helper_ran_again() -> bool:
        path = f"/v2/{upstream.namespace}/probe/n{next(probes)}/tags/list"
        get(server, path)
        return len(helper_calls(calls)) > len(first_calls)

    wait_until(helper_ran_again, 15.0, "helper run again", interval=0.2)

    assert first_calls == [upstream.namespace]
    assert helper_calls(calls)[-1] == upstream.namespace
    assert time.monotonic() - first_pull >= expiry - 0.1


def test_credential_helper_login_is_used_for_the_token_exchange(
    fake_upstream, oci_server, tmp_path
):
    fake = fake_upstream(auth="bearer", credentials=(USER, HELPER_SECRET))
    fake.add_image(REPO, "1", IMAGE)
    calls = install_helper(tmp_path, "tokens")
    token = {"provider": "helper", "providerOpts": "name=tokens", "expiry": "1h"}
    server = oci_server(
        config={"registries": [fake.registry_config(auth={"token": token})]},
        env=helper_env(tmp_path),
    )

    pull_image(server, fake.namespace)

    assert helper_calls(calls) == [fake.namespace]
    assert fake.count("/token", status=200) >= 1
    assert fake.count("/token", status=401) == 0


def test_failing_credential_helper_is_502_naming_the_upstream(
    registry_upstream_factory, oci_server, tmp_path
):
    upstream = htpasswd_upstream(registry_upstream_factory)
    script = tmp_path / "docker-credential-broken"
    script.write_text("#!/bin/sh\necho 'credentials not found in store'\nexit 1\n")
    script.chmod(0o755)
    token = {"provider": "helper", "providerOpts": "name=broken"}
    server = oci_server(
        config={"registries": [entry(upstream, token=token)]},
        env=helper_env(tmp_path),
    )

    response = get(server, f"/v2/{upstream.namespace}/{REPO}/manifests/1")

    assert response.status == 502
    message = response.json()["errors"][0]["message"]
    assert upstream.namespace in message
    assert "docker-credential-broken" in message


@pytest.mark.slow
def test_debug_log_and_admin_output_hold_no_secret(
    registry_upstream_factory, fake_upstream, oci_server, tmp_path
):
    basic = htpasswd_upstream(registry_upstream_factory)
    from_env = htpasswd_upstream(registry_upstream_factory, ENV_PASSWORD)
    helped = htpasswd_upstream(registry_upstream_factory, HELPER_SECRET)
    exchanged = fake_upstream(auth="bearer", credentials=(USER, PASSWORD))
    exchanged.add_image(REPO, "1", IMAGE)
    static = fake_upstream(auth="bearer", address="127.0.0.3")
    static.add_image(REPO, "1", IMAGE)
    static.tokens[STATIC_TOKEN] = (f"repository:{REPO}:pull", time.monotonic() + 600)
    install_helper(tmp_path, "test")
    helper = {"provider": "helper", "providerOpts": "name=test"}
    registries = [
        entry(basic, user=USER, password=PASSWORD),
        entry(from_env, user=USER, passwordFromEnv=PASSWORD_VARIABLE),
        entry(helped, token=helper),
        exchanged.registry_config(),
        static.registry_config(auth={"token": {"static": STATIC_TOKEN}}),
    ]
    server = oci_server(
        config={"registries": registries},
        log_level="debug",
        env={**helper_env(tmp_path), PASSWORD_VARIABLE: ENV_PASSWORD},
    )

    for upstream in (basic, from_env, helped, exchanged, static):
        pull_image(server, upstream.namespace)
    admin = [
        get(server, f"/cmd/{listing}?count=-1").data.decode()
        for listing in ("image/list", "manifest/list", "blob/list")
    ]
    log = server.read_log()

    issued = list(exchanged.tokens)
    secrets = [PASSWORD, ENV_PASSWORD, HELPER_SECRET, STATIC_TOKEN, *issued]
    assert issued
    assert "DEBU[" in log
    assert "request headers:" in log
    for secret in secrets:
        assert secret not in log
        assert all(secret not in text for text in admin)
    basic_login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert basic_login not in log
