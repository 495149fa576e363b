"""schemathesis against a real `adapterhub serve`: thousands of generated requests, valid and not,
from the server's own OpenAPI document. No server error, every status, header, content type and
body as documented, every schema-invalid request refused. Bounded: a fixed seed and a few dozen
examples per operation (about 10 s)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serving import Server, make_model_dir

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,negative_data_rejection,unsupported_method,allow_header_conformance"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("schemathesis")
    dirs = make_model_dir(root)
    (root / "keys.json").write_text(json.dumps({"keys": {"sk-admin": "*"}}))
    server = Server(
        [
            "--base",
            str(root / "base"),
            "--served-model-name",
            "SmolLM2-135M-Instruct",  # the name the document's examples use: they reach the engine
            "--adapter",
            f"a0={dirs['a0']}",
            "--adapter-dir",
            str(root / "adapters"),
            "--max-adapters",
            "2",
            "--max-rank",
            "8",
            "--max-batch",
            "4",
            "--max-step-tokens",
            "16",
            "--api-key",
            str(root / "keys.json"),
        ],
        cwd=root,
    )
    yield server, root
    server.stop()


def test_schemathesis_finds_no_fault(server):
    url = server[0].url.removesuffix("/v1")
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    run = subprocess.run(
        [
            st,
            "run",
            f"{url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            "30",
            "--seed",
            "1",
            "--header",
            "Authorization: Bearer sk-admin",
            "--request-timeout",
            "60",
            "--no-color",
        ],
        cwd=server[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Traceback" not in server[0].log(), server[0].log()[-4000:]
