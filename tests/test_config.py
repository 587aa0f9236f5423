"""Connection options from the environment."""

from __future__ import annotations

import bus


def test_connect_options_read_urls_credentials_and_tls_from_the_environment() -> None:
    env = {
        "NATS_URL": "nats://a:4222, nats://b:4222",
        "NATS_USER": "u",
        "NATS_PASSWORD": "s3cret-pw",
        "NATS_TOKEN": "s3cret-tok",
        "NATS_CREDS": "/x.creds",
        "NATS_CA": "/ca.pem",
    }
    opts = bus.ConnectOptions.from_env(env)
    assert opts.servers == ("nats://a:4222", "nats://b:4222")
    got = (opts.user, opts.password, opts.token, opts.creds, opts.tls_ca)
    assert got == ("u", "s3cret-pw", "s3cret-tok", "/x.creds", "/ca.pem")
    assert "s3cret" not in repr(opts)  # secrets stay out of logs


def test_arguments_win_over_the_environment() -> None:
    opts = bus.ConnectOptions.from_env({"NATS_URL": "nats://env:4222"}, servers="nats://arg:1,nats://arg:2")
    assert opts.servers == ("nats://arg:1", "nats://arg:2")


def test_no_url_means_embedded() -> None:
    assert bus.ConnectOptions.from_env({}).servers == ()
