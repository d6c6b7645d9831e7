"""The README's n8n Code node that checks ``X-Taskman-Signature``, run in Node.js as n8n runs
it (``$input``, ``$env``, ``this.helpers``), against a callback a real ``taskman worker``
signed and delivered to a receiver on 127.0.0.1; and against forgeries of it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories import create_task
from tests.missing_tools import missing
from tests.remote_api import Hit, start_receiver
from tests.worker_harness import REPO, start_worker_process, wait_until
from worker.notify.completion_callbacks import sign

SECRET = "n8n-shares-this-secret-with-taskman"

# What n8n gives a Code node, reduced to what the recipe uses.
HARNESS = r"""
const fs = require("fs");
const [code, item, secret] = [fs.readFileSync(process.argv[2], "utf8"),
                              JSON.parse(fs.readFileSync(process.argv[3], "utf8")),
                              process.argv[4]];
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
const node = new AsyncFunction("$input", "$env", "require", code);
const context = { helpers: { getBinaryDataBuffer: async (index, name) =>
  Buffer.from(item.binary[name].data, "base64") } };
node.call(context, { first: () => item, all: () => [item] },
          { TASKMAN_CALLBACK_SECRET: secret }, require)
  .then((out) => console.log(JSON.stringify(out)),
        (err) => { console.log("REFUSED " + err.message); process.exit(3); });
"""


def readme_code_node() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Secure the resume URL.**"):]
    match = re.search(r"```js\n(.*?)```", section, re.DOTALL)
    assert match, "the README's n8n section has no Code node"
    return re.sub(r"^ {3}", "", match.group(1), flags=re.MULTILINE)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None:
        missing("Node.js is not installed (it runs the README's n8n Code node)")
    base = tmp_path_factory.mktemp("n8n")
    (base / "harness.js").write_text(HARNESS)
    (base / "code_node.js").write_text(readme_code_node())
    return base


@pytest.fixture
def delivered(conn, database_url) -> Iterator[Hit]:
    """A completion callback as a real worker signs and sends it."""
    receiver = start_receiver(answer={"resumed": True})
    worker = start_worker_process(database_url, TASKMAN_CALLBACK_SECRET=SECRET)
    try:
        task_id = create_task(conn, poll_url=None, callback_url=receiver.url("/webhook-waiting/41"),
                              metadata={"note": "café ✓"})["task_id"]
        conn.execute("select taskman.update_task(%s, 'completed', %s::jsonb)",
                     (task_id, json.dumps({"rows": 3, "ratio": 0.25, "path": "a/b"})))
        [hit] = wait_until(receiver.hits, timeout=20)
        yield hit
    finally:
        worker.terminate()
        worker.wait(15)
        receiver.stop()


def as_n8n_item(headers: dict[str, str], body: bytes, raw_body: bool = True) -> dict[str, Any]:
    """The Wait node's output on resume: lower-cased headers, the parsed body and, with the
    Raw Body option, the bytes as binary data."""
    item: dict[str, Any] = {"json": {"headers": {k.lower(): v for k, v in headers.items()},
                                     "params": {}, "query": {}, "body": json.loads(body)}}
    if raw_body:
        item["binary"] = {"data": {"data": base64.b64encode(body).decode(),
                                   "mimeType": "application/json"}}
    return item


def run_code_node(node: Path, item: dict[str, Any], secret: str = SECRET) -> tuple[int, str]:
    (node / "item.json").write_text(json.dumps(item))
    done = subprocess.run(["node", str(node / "harness.js"), str(node / "code_node.js"),
                           str(node / "item.json"), secret],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode in (0, 3), done.stderr
    return done.returncode, done.stdout.strip()


def test_a_genuine_callback_goes_on_with_the_task(node, delivered) -> None:
    code, out = run_code_node(node, as_n8n_item(delivered.headers, delivered.body))
    assert code == 0, out
    [item] = json.loads(out)
    assert item["json"] == json.loads(delivered.body)
    assert item["json"]["status"] == "completed"


def test_without_raw_body_the_reserialised_body_still_verifies(node, delivered) -> None:
    code, out = run_code_node(node, as_n8n_item(delivered.headers, delivered.body, False))
    assert code == 0, out


def test_a_forged_resume_is_stopped(node, delivered) -> None:
    forged = json.loads(delivered.body) | {"result": {"rows": 999}}
    body = json.dumps(forged, separators=(",", ":")).encode()
    unsigned = {k: v for k, v in delivered.headers.items()
                if k.lower() not in ("x-taskman-signature", "x-taskman-timestamp")}
    attempts = [
        as_n8n_item(delivered.headers, body),  # the real signature on a changed body
        as_n8n_item(unsigned, delivered.body),  # no signature at all
        as_n8n_item(unsigned | {"X-Taskman-Timestamp": str(int(time.time())),
                                "X-Taskman-Signature": "sha256=" + "0" * 64}, body),
    ]
    for item in attempts:
        assert run_code_node(node, item)[0] == 3


def test_another_secret_or_an_old_signature_is_stopped(node, delivered) -> None:
    assert run_code_node(node, as_n8n_item(delivered.headers, delivered.body),
                         secret="not-the-secret")[0] == 3
    old = int(time.time()) - 3600
    replayed = delivered.headers | {"X-Taskman-Timestamp": str(old),
                                    "X-Taskman-Signature": sign(SECRET, old, delivered.body)}
    code, out = run_code_node(node, as_n8n_item(replayed, delivered.body))
    assert code == 3 and "Not a genuine Taskman callback" in out
