"""The README's n8n Code node that checks a completion callback's ``webhook-signature`` and
what it is for (this execution's resume URL, the owner, the task), run in Node.js as n8n runs
it (``$input``, ``$env``, ``$execution``, ``$("Create task")``, ``this.helpers``), against
callbacks a real ``taskman worker`` signed and delivered to a receiver on 127.0.0.1; and
against forgeries of them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.factories import USER_A, USER_B, create_task
from tests.missing_tools import missing
from tests.remote_api import Hit, start_receiver
from tests.worker_harness import REPO, start_worker_process, wait_until
from worker.notify.owner_secrets import keyed
from worker.notify.signing import v1_signature

# The deployment's secret: any string (keyed as its UTF-8 bytes).
SHARED = "n8n-shares-this-secret-with-taskman"

# What n8n gives a Code node, reduced to what the recipe uses.
HARNESS = r"""
const fs = require("fs");
const [code, item, context] = [fs.readFileSync(process.argv[2], "utf8"),
                               JSON.parse(fs.readFileSync(process.argv[3], "utf8")),
                               JSON.parse(fs.readFileSync(process.argv[4], "utf8"))];
const AsyncFunction = Object.getPrototypeOf(async function () {}).constructor;
const node = new AsyncFunction("$input", "$env", "$execution", "$", "require", code);
const self = { helpers: { getBinaryDataBuffer: async (index, name) =>
  Buffer.from(item.binary[name].data, "base64") } };
const nodes = { "Create task": context.created };
node.call(self, { first: () => item, all: () => [item] }, context.env,
          { resumeUrl: context.resumeUrl },
          (name) => ({ first: () => ({ json: nodes[name] }) }), require)
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


@dataclass
class Resumed:
    """A callback as the workflow's Wait node got it, and what the workflow knows: the
    task it created (`Create task`'s output), its resume URL, the secret and owner."""

    hit: Hit
    task_id: str
    resume_url: str
    secret: str
    user_id: str | None


def _complete(api, conn, task: dict[str, Any], result: dict[str, Any]) -> None:
    if task.get("user_id"):
        api.rpc("anon", "update_task", task_id=task["task_id"], status="completed",
                result=json.dumps(result), callback_token=task["callback_token"])
    else:
        conn.execute("select taskman.update_task(%s, 'completed', %s::jsonb)",
                     (task["task_id"], json.dumps(result)))


@pytest.fixture
def callbacks(conn, api, database_url) -> Iterator[dict[str, Resumed]]:
    """Completion callbacks as a real worker signs and sends them: a workflow of user A's
    (A's own secret), another user's task aimed at A's resume URL, and a workflow of the
    service's (the deployment's secret)."""
    receiver = start_receiver(answer={"resumed": True})
    own_secret = api.rpc("authenticated", "rotate_callback_secret", sub=USER_A)["secret"]
    worker = start_worker_process(database_url, TASKMAN_CALLBACK_SECRET=SHARED)
    try:
        mine_url = receiver.url("/webhook-waiting/41")
        mine = api.rpc("authenticated", "create_task", sub=USER_A, callback_url=mine_url,
                       metadata=json.dumps({"note": "café ✓", "order": "A-7"}))
        theirs = api.rpc("authenticated", "create_task", sub=USER_B, callback_url=mine_url,
                         metadata=json.dumps({"order": "A-7"}))
        service_url = receiver.url("/webhook-waiting/42")
        service = create_task(conn, poll_url=None, callback_url=service_url)
        _complete(api, conn, mine, {"rows": 3, "ratio": 0.25, "path": "a/b"})
        _complete(api, conn, theirs, {"rows": 999})
        _complete(api, conn, service, {"rows": 1})
        hits = wait_until(lambda: len(receiver.hits()) == 3 and receiver.hits(), timeout=20)
        by_task = {h.json()["task_id"]: h for h in hits}
        yield {
            "mine": Resumed(by_task[mine["task_id"]], mine["task_id"], mine_url, own_secret,
                            USER_A),
            "theirs": Resumed(by_task[theirs["task_id"]], mine["task_id"], mine_url,
                              own_secret, USER_A),
            "service": Resumed(by_task[service["task_id"]], service["task_id"], service_url,
                               SHARED, None),
        }
    finally:
        worker.terminate()
        worker.communicate(timeout=30)  # reads its stderr meanwhile: a full pipe cannot stall it
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


def run_code_node(node: Path, resumed: Resumed, item: dict[str, Any] | None = None,
                  **changes: Any) -> tuple[int, str]:
    """Run the Code node on `item` (default: the callback as received) in the workflow of
    `resumed`, with `changes` to what the workflow knows (secret, user_id, task_id,
    resume_url)."""
    known = {"secret": resumed.secret, "user_id": resumed.user_id,
             "task_id": resumed.task_id, "resume_url": resumed.resume_url} | changes
    env = {"TASKMAN_SIGNING_SECRET": known["secret"]}
    if known["user_id"]:
        env["TASKMAN_USER_ID"] = known["user_id"]
    context = {"env": env, "resumeUrl": known["resume_url"],
               "created": {"task_id": known["task_id"], "status": "pending"}}
    (node / "item.json").write_text(json.dumps(
        item or as_n8n_item(resumed.hit.headers, resumed.hit.body)))
    (node / "context.json").write_text(json.dumps(context))
    done = subprocess.run(["node", str(node / "harness.js"), str(node / "code_node.js"),
                           str(node / "item.json"), str(node / "context.json")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode in (0, 3), done.stderr
    return done.returncode, done.stdout.strip()


def test_a_genuine_callback_goes_on_with_the_task(node, callbacks) -> None:
    for name in ("mine", "service"):
        resumed = callbacks[name]
        code, out = run_code_node(node, resumed)
        assert code == 0, (name, out)
        [item] = json.loads(out)
        assert item["json"] == json.loads(resumed.hit.body)
        assert item["json"]["status"] == "completed"


def test_without_raw_body_the_reserialised_body_still_verifies(node, callbacks) -> None:
    resumed = callbacks["mine"]
    item = as_n8n_item(resumed.hit.headers, resumed.hit.body, raw_body=False)
    assert run_code_node(node, resumed, item)[0] == 0


def test_another_users_task_on_your_resume_url_is_stopped(node, callbacks) -> None:
    theirs = callbacks["theirs"]
    assert json.loads(theirs.hit.body)["metadata"] == {"order": "A-7"}
    code, out = run_code_node(node, theirs)
    assert code == 3 and "Not a genuine Taskman callback" in out
    # Even with the deployment's secret, which signed it, it is not this workflow's.
    assert run_code_node(node, theirs, secret=SHARED)[0] == 3
    assert run_code_node(node, theirs, secret=SHARED, user_id=USER_B)[0] == 3  # its task id


def test_a_callback_replayed_to_another_workflow_is_stopped(node, callbacks) -> None:
    resumed = callbacks["service"]
    other = resumed.resume_url.replace("/42", "/43")
    assert run_code_node(node, resumed, resume_url=other)[0] == 3


def test_a_forged_resume_is_stopped(node, callbacks) -> None:
    resumed = callbacks["mine"]
    forged = json.loads(resumed.hit.body) | {"result": {"rows": 999}}
    body = json.dumps(forged, separators=(",", ":")).encode()
    unsigned = {k: v for k, v in resumed.hit.headers.items()
                if not k.lower().startswith("webhook-") and not k.lower().startswith("x-taskman")}
    now = int(time.time())
    attempts = [
        as_n8n_item(resumed.hit.headers, body),  # the real signature on a changed body
        as_n8n_item(unsigned, resumed.hit.body),  # no signature at all
        as_n8n_item(unsigned | {"webhook-id": "msg_1", "webhook-timestamp": str(now),
                                "webhook-signature": "v1," + "A" * 43 + "="}, body),
        # The deprecated signature alone no longer opens the node.
        as_n8n_item(unsigned | {k: v for k, v in resumed.hit.headers.items()
                                if k.lower().startswith("x-taskman")}, resumed.hit.body),
    ]
    for item in attempts:
        assert run_code_node(node, resumed, item)[0] == 3


def test_another_secret_or_an_old_signature_is_stopped(node, callbacks) -> None:
    resumed = callbacks["mine"]
    assert run_code_node(node, resumed, secret=SHARED)[0] == 3
    old = int(time.time()) - 3600
    msg_id = resumed.hit.headers["webhook-id"]
    replayed = resumed.hit.headers | {
        "webhook-timestamp": str(old),
        "webhook-signature": v1_signature(keyed(resumed.secret), msg_id, old, resumed.hit.body)}
    code, out = run_code_node(node, resumed, as_n8n_item(replayed, resumed.hit.body))
    assert code == 3 and "Not a genuine Taskman callback" in out


def test_the_node_checks_the_same_signature_as_the_spec(callbacks) -> None:
    """The deployment's secret without `whsec_` is keyed as its UTF-8 bytes."""
    hit = callbacks["service"].hit
    signed = f"{hit.headers['webhook-id']}.{hit.headers['webhook-timestamp']}.".encode() + hit.body
    expected = base64.b64encode(hmac.new(SHARED.encode(), signed, hashlib.sha256).digest())
    assert hit.headers["webhook-signature"] == "v1," + expected.decode()
