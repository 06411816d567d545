"""RunPod-style async jobs on the real path: a live proxy, SmolLM2 through llama.cpp, raw HTTP (the
``runpod`` SDK pulls fastapi[all], boto3, paramiko and more: too much for a test dependency; its
``Endpoint`` makes exactly these calls: POST {id}/run, {id}/runsync, GET {id}/status/{job}, POST
{id}/cancel/{job}, GET {id}/health)."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.harness import REPO, LiveProxy, fake_config, smollm2_config, smollm2_path, wait_until

pytestmark = pytest.mark.real

USER = "user-key-1"
OTHER = "user-key-2"
TOKENS = {"api_key": [USER, OTHER], "admin_key": ["admin-key"]}
CHAT = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def with_jobs(proxy: LiveProxy, data_dir: Path, **jobs: Any) -> LiveProxy:
    """The harness's config.yml with data_dir (and jobs: settings) added."""
    path = proxy.root / "config.yml"
    config = yaml.safe_load(path.read_text())
    config["data_dir"] = str(data_dir)
    if jobs:
        config["jobs"] = jobs
    path.write_text(yaml.safe_dump(config))
    return proxy


def finished(proxy: LiveProxy, model: str, job: str, key: str = USER) -> dict[str, Any] | None:
    r = httpx.get(f"{proxy.url}/v2/{model}/status/{job}", headers=auth(key), timeout=10)
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body if body["status"] in ("COMPLETED", "FAILED", "CANCELLED") else None


def test_job_completes_survives_a_restart_cancels_and_belongs_to_its_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # the first proxy: "llm" never finishes loading, so its jobs wait (one IN_PROGRESS, the rest IN_QUEUE)
    first = with_jobs(
        LiveProxy(
            tmp_path / "a", [fake_config("llm", "--hang-on-load")], tokens=TOKENS, defaults={"load_timeout": "600s"}
        ),
        data,
    ).start()
    try:
        ids = []
        for _ in range(3):
            r = httpx.post(f"{first.url}/v2/llm/run", json={"input": CHAT}, headers=auth(USER), timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "IN_QUEUE"
            ids.append(r.json()["id"])
        states = [httpx.get(f"{first.url}/v2/llm/status/{j}", headers=auth(USER)).json()["status"] for j in ids]
        assert states[1:] == ["IN_QUEUE", "IN_QUEUE"]
        # another key sees nothing of them
        assert httpx.get(f"{first.url}/v2/llm/status/{ids[0]}", headers=auth(OTHER)).status_code == 404
        assert httpx.post(f"{first.url}/v2/llm/cancel/{ids[0]}", headers=auth(OTHER)).status_code == 404
        # cancel the last one while it waits
        r = httpx.post(f"{first.url}/v2/llm/cancel/{ids[2]}", headers=auth(USER))
        assert r.json() == {"id": ids[2], "status": "CANCELLED"}
        health = httpx.get(f"{first.url}/v2/llm/health", headers=auth(USER)).json()
        assert health["jobs"]["inQueue"] == 1 and health["jobs"]["inProgress"] == 1
    finally:
        first.stop()
    # the second proxy, on the same data_dir: "llm" is SmolLM2 now; the unfinished jobs run
    second = with_jobs(LiveProxy(tmp_path / "b", [smollm2_config(name="llm", aliases=[])], tokens=TOKENS), data)
    second.start()
    try:
        # back in the queue at start-up: seen at once (a broken restart failed only after the wait below)
        health = httpx.get(f"{second.url}/v2/llm/health", headers=auth(USER)).json()["jobs"]
        assert health["inQueue"] + health["inProgress"] + health["completed"] >= 2, health
        for job in ids[:2]:
            done = wait_until(functools.partial(finished, second, "llm", job), timeout=120, interval=0.2)
            assert done["status"] == "COMPLETED", done
            assert done["output"]["choices"][0]["message"]["content"], done
            assert done["delayTime"] >= 0 and done["executionTime"] >= 0
        cancelled = httpx.get(f"{second.url}/v2/llm/status/{ids[2]}", headers=auth(USER)).json()
        assert cancelled["status"] == "CANCELLED" and "output" not in cancelled
        # runsync within its wait answers with the output; a completion job too
        r = httpx.post(
            f"{second.url}/v2/llm/runsync",
            json={"input": {"prompt": "Hello", "max_tokens": 3}},
            headers=auth(OTHER),
            timeout=120,
        )
        assert r.json()["status"] == "COMPLETED", r.text
        assert r.json()["output"]["choices"][0]["text"] is not None
        health = httpx.get(f"{second.url}/v2/llm/health", headers=auth(USER)).json()
        assert health["jobs"]["completed"] >= 3 and health["workers"]["idle"] + health["workers"]["running"] == 1
        # bad input: 400 in the usual shape, nothing queued; unknown model: 404
        r = httpx.post(f"{second.url}/v2/llm/run", json={"input": "hi"}, headers=auth(USER))
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        assert httpx.post(f"{second.url}/v2/nope/run", json={"input": CHAT}, headers=auth(USER)).status_code == 404
        assert httpx.post(f"{second.url}/v2/llm/run", json={"input": CHAT}).status_code == 401
    finally:
        second.stop()


def test_runsync_beyond_its_wait_answers_the_id_and_the_job_goes_on(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    model = fake_config("slow", "--gate-answers", str(gate))
    proxy = with_jobs(LiveProxy(tmp_path, [model]), tmp_path / "data", max_queued=2).start()
    try:
        r = httpx.post(f"{proxy.url}/v2/slow/runsync?wait=1000", json={"input": CHAT}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] in ("IN_QUEUE", "IN_PROGRESS") and "output" not in body
        # past jobs.max_queued: 503 with Retry-After
        r2 = httpx.post(f"{proxy.url}/v2/slow/run", json={"input": CHAT}, timeout=10)
        assert r2.status_code == 200
        r3 = httpx.post(f"{proxy.url}/v2/slow/run", json={"input": CHAT}, timeout=10)
        assert r3.status_code == 503 and "retry-after" in r3.headers
        gate.touch()
        done = wait_until(lambda: finished(proxy, "slow", body["id"], ""), timeout=60, interval=0.1)
        assert done["status"] == "COMPLETED" and done["output"]["choices"][0]["message"]["content"]
    finally:
        proxy.stop()


def test_dropped_gguf_is_discovered_rescanned_and_chats(tmp_path: Path) -> None:
    proxy = LiveProxy(tmp_path, [], tokens=TOKENS)
    models = proxy.root / "models"
    shutil.copy(smollm2_path(), models / "Tiny-Chat.Q4_1.gguf")
    (models / "broken.gguf").write_bytes(b"not a gguf at all")
    proxy.start()
    try:
        tags = httpx.get(f"{proxy.url}/api/tags", headers=auth(USER)).json()["models"]
        assert [m["name"] for m in tags] == ["tiny-chat.q4_1:latest"]
        assert "broken.gguf" in proxy.log()  # skipped with a warning
        r = httpx.post(
            f"{proxy.url}/api/chat",
            json={
                "model": "tiny-chat.q4_1",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
                "options": {"num_predict": 3},
            },
            headers=auth(USER),
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["message"]["role"] == "assistant"
        # a second copy appears on rescan (admin only); the first stays loaded
        shutil.copy(smollm2_path(), models / "second.gguf")
        assert httpx.post(f"{proxy.url}/models/rescan", headers=auth(USER)).status_code == 403
        r = httpx.post(f"{proxy.url}/models/rescan", headers=auth("admin-key"))
        assert r.status_code == 200 and sorted(r.json()["discovered"]) == ["second:latest", "tiny-chat.q4_1:latest"]
        assert proxy.status(auth(USER))["tiny-chat.q4_1:latest"]["state"] == "ready"
        # removed from models/: gone from the lists, and unloaded (it was idle)
        (models / "Tiny-Chat.Q4_1.gguf").unlink()
        httpx.post(f"{proxy.url}/models/rescan", headers=auth("admin-key")).raise_for_status()
        wait_until(lambda: "tiny-chat.q4_1:latest" not in proxy.status(auth(USER)), timeout=30)
        names = [m["name"] for m in httpx.get(f"{proxy.url}/api/tags", headers=auth(USER)).json()["models"]]
        assert names == ["second:latest"]
        # the content id (sha256 prefix of the file) names it too, once hashed
        cid = hashlib.sha256((models / "second.gguf").read_bytes()).hexdigest()[:12]

        def by_id() -> bool:
            r = httpx.post(
                f"{proxy.url}/v1/chat/completions",
                json={"model": cid, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                headers=auth(USER),
                timeout=120,
            )
            return r.status_code == 200

        wait_until(by_id, timeout=60, interval=0.2)
        assert (models / ".cache" / "digests.json").is_file()
    finally:
        proxy.stop()


def _shipped(name: str) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load((REPO / "configs" / name).read_text())
    return cfg


def test_speech_transcription_and_embedding_jobs_run_their_real_routes(tmp_path: Path) -> None:
    # Piper speaks, Whisper hears what it said (audio in base64 both ways), SmolLM2 embeds
    models = [_shipped("piper.yaml"), _shipped("whisper.yaml"), smollm2_config()]
    proxy = with_jobs(LiveProxy(tmp_path, models), tmp_path / "data").start()
    try:

        def runsync(model: str, job_input: dict[str, Any]) -> dict[str, Any]:
            r = httpx.post(f"{proxy.url}/v2/{model}/runsync", json={"input": job_input}, timeout=300)
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            assert body["status"] == "COMPLETED", body
            return body

        spoken = runsync(
            "piper-joe", {"input": "The quick brown fox jumps over the lazy dog.", "response_format": "wav"}
        )
        assert spoken["output"]["content_type"].startswith("audio/wav")
        wav = base64.b64decode(spoken["output"]["base64"])
        assert wav[:4] == b"RIFF" and len(wav) > 20_000
        heard = runsync("whisper-base", {"audio": spoken["output"]["base64"], "language": "en"})
        assert "fox" in heard["output"]["text"].lower(), heard
        embedded = runsync("smollm2", {"input": ["a fox", "a dog"]})
        vectors = [d["embedding"] for d in embedded["output"]["data"]]
        assert len(vectors) == 2 and len(vectors[0]) == 576 and vectors[0] != vectors[1]
        # input that cannot make the route's body is refused at once; a body the route refuses fails the job
        bad = httpx.post(f"{proxy.url}/v2/whisper-base/run", json={"input": {"audio": "%%"}}, timeout=60)
        assert bad.status_code == 400 and "base64" in bad.text, bad.text
        noise = base64.b64encode(b"not audio at all" * 64).decode()
        failed = httpx.post(f"{proxy.url}/v2/whisper-base/runsync", json={"input": {"audio": noise}}, timeout=60).json()
        assert failed["status"] == "FAILED" and failed["error"].startswith("4"), failed
    finally:
        proxy.stop()


def test_a_failed_job_keeps_no_input_to_retry_and_a_purge_cancels_only_the_callers_waiting_jobs(tmp_path: Path) -> None:
    never, gate = tmp_path / "never", tmp_path / "gate"
    models = [fake_config("flaky", "--fail-unless", str(never)), fake_config("slow", "--gate-answers", str(gate))]
    proxy = with_jobs(LiveProxy(tmp_path, models, tokens=TOKENS), tmp_path / "data").start()
    url = proxy.url
    try:
        # its model cannot load: the job fails, and its input is dropped as it ends (issue 26, finding 3),
        # so /retry cannot run it again: 409, saying so
        failed = httpx.post(f"{url}/v2/flaky/runsync", json={"input": CHAT}, headers=auth(USER), timeout=60).json()
        assert failed["status"] == "FAILED" and failed["error"].startswith("503"), failed
        assert httpx.post(f"{url}/v2/flaky/retry/{failed['id']}", headers=auth(OTHER)).status_code == 404
        again = httpx.post(f"{url}/v2/flaky/retry/{failed['id']}", headers=auth(USER))
        assert again.status_code == 409 and "input is not kept" in again.json()["error"]["message"], again.text

        # purge: one job runs (held at the gate), two of USER's and one of OTHER's wait
        def run(key: str) -> str:
            r = httpx.post(f"{url}/v2/slow/run", json={"input": CHAT}, headers=auth(key), timeout=10)
            return str(r.json()["id"])

        running = run(USER)
        waiting = [run(USER), run(USER)]
        theirs = run(OTHER)
        purged = httpx.post(f"{url}/v2/slow/purge-queue", headers=auth(USER), timeout=10)
        assert purged.json() == {"removed": 2, "status": "completed"}, purged.text
        for job in waiting:
            assert httpx.get(f"{url}/v2/slow/status/{job}", headers=auth(USER)).json()["status"] == "CANCELLED"
        assert httpx.get(f"{url}/v2/slow/status/{theirs}", headers=auth(OTHER)).json()["status"] == "IN_QUEUE"
        gate.touch()
        for job, key in ((running, USER), (theirs, OTHER)):
            done = wait_until(functools.partial(finished, proxy, "slow", job, key), timeout=60, interval=0.1)
            assert done["status"] == "COMPLETED", done
    finally:
        proxy.stop()


def test_a_jobs_database_from_before_retry_opens_and_its_jobs_can_be_retried(tmp_path: Path) -> None:
    import sqlite3

    from proxy.jobs import JobStore, Outcome, Status

    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, model TEXT NOT NULL,"
        " owner TEXT NOT NULL, role INTEGER NOT NULL, input TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,"
        " started REAL, finished REAL, output TEXT, error TEXT);"
        "INSERT INTO jobs (id, model, owner, role, input, status, created, finished, error)"
        " VALUES ('j1', 'm', 'o', 1, '{}', 'FAILED', 1.0, 2.0, 'boom');"
    )
    old.commit()
    old.close()
    store = JobStore(path)
    try:
        assert store.finished_counts("m") == {"FAILED": 1, "retried": 0}
        assert store.requeue("j1") and not store.requeue("j1")  # once: it is IN_QUEUE now
        job = store.get("j1")
        assert job is not None and job.status is Status.IN_QUEUE and job.error is None and job.finished is None
        store.finish("j1", Outcome(Status.COMPLETED, output={"ok": True}), 3.0)
        assert store.finished_counts("m") == {"COMPLETED": 1, "retried": 1}
    finally:
        store.close()


def listed(proxy: LiveProxy, key: str, **query: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{proxy.url}/v2/jobs", params=query, headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    jobs: list[dict[str, Any]] = r.json()["jobs"]
    return jobs


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_jobs_of_a_removed_model_end_failed_at_start_up_and_on_reload(tmp_path: Path) -> None:
    """Issue 25, defect 2: five jobs queued for a model, the proxy stopped, its YAML removed, the proxy
    started: it starts, and the jobs say FAILED with the reason. A reload that removes a model does the same
    to its waiting jobs, which no longer count against jobs.max_queued."""
    gate = tmp_path / "gate"
    models = [fake_config("gone", "--gate-answers", str(gate)), fake_config("held", "--gate-answers", str(gate))]
    proxy = with_jobs(LiveProxy(tmp_path, models, tokens=TOKENS), tmp_path / "data", max_queued=8).start()
    try:
        for _ in range(5):  # the first runs (held at the gate), four wait
            r = httpx.post(f"{proxy.url}/v2/gone/run", json={"input": CHAT}, headers=auth(USER), timeout=10)
            assert r.status_code == 200, r.text
        proxy.stop()
        (proxy.root / "configs" / "gone.yaml").unlink()
        proxy.start()  # before the fix: "Application startup failed" (ModelNotFound in Jobs.start)
        jobs = listed(proxy, USER)
        assert len(jobs) == 5 and {j["status"] for j in jobs} == {"FAILED"}, jobs
        assert {j["error"] for j in jobs} == {"model 'gone' is no longer configured"}
        assert httpx.get(f"{proxy.url}/v2/gone/status/{jobs[0]['id']}", headers=auth(USER)).status_code == 404

        # at run time: a reload (SIGHUP) that removes "held" ends its waiting jobs and frees their places
        ids = []
        for _ in range(8):  # jobs.max_queued: 8
            r = httpx.post(f"{proxy.url}/v2/held/run", json={"input": CHAT}, headers=auth(OTHER), timeout=10)
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        assert httpx.post(f"{proxy.url}/v2/held/run", json={"input": CHAT}, headers=auth(OTHER)).status_code == 503
        (proxy.root / "configs" / "held.yaml").unlink()
        (proxy.root / "configs" / "fresh.yaml").write_text(yaml.safe_dump(fake_config("fresh")))
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)

        def waiting_failed() -> bool:
            jobs = {j["id"]: j for j in listed(proxy, OTHER)}
            return all(jobs[i]["status"] == "FAILED" for i in ids[1:])

        wait_until(waiting_failed, timeout=30, interval=0.1)
        assert {j["error"] for j in listed(proxy, OTHER, status="FAILED")} == {"model 'held' is no longer configured"}
        # seven places are free again (the running one holds its place until its request ends)
        r = httpx.post(f"{proxy.url}/v2/fresh/runsync", json={"input": CHAT}, headers=auth(OTHER), timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text
    finally:
        gate.touch()
        proxy.stop()


def test_a_keys_sixth_queued_job_is_a_429_while_another_keys_is_accepted_and_admins_see_every_key(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    model = fake_config("slow", "--gate-answers", str(gate))
    proxy = with_jobs(LiveProxy(tmp_path, [model], tokens=TOKENS), tmp_path / "data", max_queued_per_key=5).start()
    url = proxy.url
    try:
        mine = []
        for _ in range(5):  # one runs (held at the gate), four wait
            r = httpx.post(f"{url}/v2/slow/run", json={"input": CHAT}, headers=auth(USER), timeout=10)
            assert r.status_code == 200, r.text
            mine.append(r.json()["id"])
        sixth = httpx.post(f"{url}/v2/slow/run", json={"input": CHAT}, headers=auth(USER), timeout=10)
        assert sixth.status_code == 429, sixth.text
        assert sixth.headers["retry-after"] == "5"
        error = sixth.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "max_queued_per_key" in error["message"], error
        theirs = httpx.post(f"{url}/v2/slow/run", json={"input": CHAT}, headers=auth(OTHER), timeout=10)
        assert theirs.status_code == 200, theirs.text

        # a user key sees its own jobs only; an admin every key's, with their owners
        assert {j["id"] for j in listed(proxy, USER)} == set(mine)
        assert httpx.get(f"{url}/v2/jobs", params={"owner": key_id(OTHER)}, headers=auth(USER)).status_code == 403
        assert httpx.get(f"{url}/v2/slow/status/{theirs.json()['id']}", headers=auth(USER)).status_code == 404
        everyone = listed(proxy, "admin-key")
        assert len(everyone) == 6 and {j["owner"] for j in everyone} == {key_id(USER), key_id(OTHER)}
        assert [j["id"] for j in listed(proxy, "admin-key", owner=key_id(OTHER))] == [theirs.json()["id"]]
        # an admin cancels one of them, and purges the rest of USER's waiting jobs
        r = httpx.post(f"{url}/v2/slow/cancel/{mine[4]}", headers=auth("admin-key"))
        assert r.json() == {"id": mine[4], "status": "CANCELLED"}, r.text
        r = httpx.post(f"{url}/v2/slow/purge-queue", params={"owner": key_id(USER)}, headers=auth("admin-key"))
        assert r.json() == {"removed": 3, "status": "completed"}, r.text
        assert httpx.get(f"{url}/v2/slow/status/{theirs.json()['id']}", headers=auth(OTHER)).json()["status"] in (
            "IN_QUEUE",
            "IN_PROGRESS",
        )
        # USER has one job (running) now: room for four more
        for _ in range(4):
            r = httpx.post(f"{url}/v2/slow/run", json={"input": CHAT}, headers=auth(USER), timeout=10)
            assert r.status_code == 200, r.text
    finally:
        gate.touch()
        proxy.stop()


def test_queued_jobs_hold_no_input_in_the_proxy_and_what_the_route_refuses_is_refused_at_submit(
    tmp_path: Path,
) -> None:
    """Issue 26, findings 1 and 3: four queued 1 MiB jobs grow the proxy's RSS by under 20 MiB (the input is
    on disk only), and no finished job keeps its input; a request the route would refuse is a 4xx at submit."""
    gate = tmp_path / "gate"
    data = tmp_path / "data"
    model = fake_config("slow", "--gate-answers", str(gate))
    proxy = with_jobs(LiveProxy(tmp_path, [model], tokens=TOKENS), data).start()
    url = proxy.url
    assert proxy.proc is not None
    process = psutil.Process(proxy.proc.pid)
    try:
        first = httpx.post(f"{url}/v2/slow/run", json={"input": CHAT}, headers=auth(USER), timeout=10)
        assert first.status_code == 200  # runs, held at the gate: the next ones wait
        wait_until(lambda: proxy.status(auth(USER))["slow"]["in_flight"] == 1, timeout=30)
        # 1 MiB of JSON in many small objects: parsed, it takes about ten times that (one big string would
        # take only its size, and would not show a job kept in memory)
        big = {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 34_000}
        assert len(json.dumps({"input": big}, separators=(",", ":"))) > 2**20
        warm = httpx.post(f"{url}/v2/slow/run", json={"input": big}, headers=auth(OTHER), timeout=30)
        assert warm.status_code == 200  # the code paths a 1 MB job takes, warmed before the measure
        before = process.memory_info().rss
        for _ in range(4):
            r = httpx.post(f"{url}/v2/slow/run", json={"input": big}, headers=auth(USER), timeout=30)
            assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE", r.text
        grown = (process.memory_info().rss - before) / 2**20
        print(f"proxy RSS grew {grown:.1f} MiB for four queued 1 MiB jobs")
        assert grown < 20, grown  # issue 26's bound is 40 MiB; kept in memory, these four took 40 MiB or more

        # the route's own checks run at submit: a 400 there, nothing stored
        count = len(listed(proxy, USER))
        for bad in (
            {"messages": "hi"},
            {**CHAT, "temperature": "hot"},
            {**CHAT, "keep_alive": 0},  # a user key may not unload a model: 403 from the route
        ):
            r = httpx.post(f"{url}/v2/slow/run", json={"input": bad}, headers=auth(USER), timeout=10)
            assert 400 <= r.status_code < 500 and "error" in r.json(), (bad, r.text)
        assert len(listed(proxy, USER)) == count

        gate.touch()
        wait_until(lambda: all(j["status"] == "COMPLETED" for j in listed(proxy, USER)), timeout=60, interval=0.1)
        wait_until(lambda: all(j["status"] == "COMPLETED" for j in listed(proxy, OTHER)), timeout=60, interval=0.1)
    finally:
        gate.touch()
        proxy.stop()
    db = sqlite3.connect(data / "jobs.sqlite3")
    try:
        kept = db.execute("SELECT COUNT(*) FROM jobs WHERE input IS NOT NULL").fetchone()[0]
        total = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    finally:
        db.close()
    assert total == 6 and kept == 0
