"""Real nginx (Debian's package, started by the test with its own config)
in front of uringserve over a Unix socket: the app sees the client address
and scheme from X-Forwarded-*, and a direct client cannot spoof them."""

import os
import sys
import shutil
import signal
import subprocess
import time

import httpx
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from http_support import free_port, serve  # noqa: E402

E2E = os.path.dirname(os.path.abspath(__file__))
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{ server unix:{sock}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path):
    sock = str(tmp_path / "app.sock")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(CONF.format(tmp=tmp_path, sock=sock, port=port))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path), "-e", str(tmp_path / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with httpx.Client() as c:
                c.get(f"http://127.0.0.1:{port}/", timeout=0.5)
            break
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "error.log").read_text())
            time.sleep(0.05)
    yield port, sock
    proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_nginx_in_front_over_unix_socket(nginx, tmp_path):
    port, sock = nginx
    with serve("webapps.fastapi_app:app", "--app-dir", E2E, "--uds", sock, "--forwarded-allow-ips", "unix:",
               tmp_path=str(tmp_path)) as srv:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            for _ in range(20):  # over nginx's keep-alive upstream connections
                r = c.get("/headers", headers={"User-Agent": "via-nginx", "X-Forwarded-For": "6.6.6.6"})
                assert r.status_code == 200
                # nginx overwrote the spoofed header with the real client address
                assert r.json() == {"client": "127.0.0.1", "scheme": "https", "user_agent": "via-nginx",
                                    "url": f"https://127.0.0.1:{port}/headers"}
            assert c.post("/items", json={"name": "x", "price": 1}).json()["total"] == 2
        assert srv.stop() == 0


def test_direct_client_cannot_spoof(tmp_path):
    # trusts only Unix-socket peers (the proxy); a TCP client is not one
    with serve("webapps.fastapi_app:app", "--app-dir", E2E, "--forwarded-allow-ips", "unix:",
               tmp_path=str(tmp_path)) as srv:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}") as c:
            r = c.get("/headers", headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
            assert r.json()["client"] == "127.0.0.1" and r.json()["scheme"] == "http"
        assert srv.stop() == 0
