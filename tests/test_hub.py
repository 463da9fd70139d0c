"""Pushing to the Hub: huggingface_hub's real client code runs end to end against a local stand-in for the Hub's HTTP
API on 127.0.0.1 (tests/fake_hub.py), reached through HF_ENDPOINT in a fresh `hf-rope-ext push` process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hf_rope_ext.cards import write_card
from hf_rope_ext.cli import main
from hf_rope_ext.hub import PushError, plan_push, push_folder

from .fake_hub import FakeHub
from .model_folders import PNG, save_patched_llama

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "README.md", "plots/ppl.png", "eval/perplexity.json"}
TRAINING_LEFTOVERS = {"checkpoint-200/model.safetensors", "checkpoint-200/optimizer.pt", "checkpoint-200/scheduler.pt",
                      "checkpoint-200/trainer_state.json", "optimizer.pt", "rng_state.pth", "training_args.bin",
                      "runs/events.out.tfevents.1", ".DS_Store"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A complete extended model folder (weights, config, tokenizer, card, plot) plus what training leaves behind."""
    root = tmp_path_factory.mktemp("push")
    folder = save_patched_llama(root / "tiny-yarn", "yarn")
    (root / "ppl.png").write_bytes(PNG)
    (root / "perplexity.json").write_text(json.dumps(
        {"kind": "rows", "plots": ["ppl.png"], "rows": [{"task": "perplexity", "length": 256, "value": 9.87}]}))
    write_card(folder, results=[root / "perplexity.json"], repo_id="tester/tiny-yarn")  # copies plots/ppl.png
    (folder / "eval").mkdir()
    shutil.copy(root / "perplexity.json", folder / "eval" / "perplexity.json")
    for rel in TRAINING_LEFTOVERS:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"training state " + rel.encode())
    return folder


@pytest.fixture
def folder(model_dir, tmp_path) -> Path:
    copy = tmp_path / "tiny-yarn"
    shutil.copytree(model_dir, copy)
    return copy


def run_push(*args: str, endpoint: str, token: str | None, home: Path) -> subprocess.CompletedProcess:
    """`hf-rope-ext push ...` in a fresh process whose huggingface_hub talks to ``endpoint`` only."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")
           and not k.lower().endswith("_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), NO_PROXY="127.0.0.1,localhost",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if token is not None:
        env["HF_TOKEN"] = token
    code = "import sys; from hf_rope_ext.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "push", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_requests(hub: FakeHub) -> list[tuple[str, str]]:
    """Requests that create, change or delete something on the Hub."""
    return [(m, p) for m, p in hub.requests if m in ("POST", "DELETE", "PUT") and p != "/api/validate-yaml"]


# --------------------------------------------------------------------------------------------------------------------
# end to end


def test_push_end_to_end_sends_the_model_and_not_the_checkpoints(folder, tmp_path):
    with FakeHub(token="hf_secret") as hub:
        proc = run_push(str(folder), "tester/tiny-yarn", "--private", endpoint=hub.url, token="hf_secret",
                        home=tmp_path / "hf_home")
        assert proc.returncode == 0, proc.stderr
        assert f"{hub.url}/tester/tiny-yarn" in proc.stdout

        repo = hub.repos["tester/tiny-yarn"]
        assert repo.private
        assert len(repo.commits) == 1
        commit = repo.commits[0]
        assert set(commit.files) == MODEL_FILES
        assert not set(commit.files) & TRAINING_LEFTOVERS
        for rel, content in commit.files.items():  # exactly the local bytes arrived
            assert content == (folder / rel).read_bytes(), rel
        assert "yarn" in commit.summary and "64 -> 256 tokens" in commit.summary
        assert f"{proc.stdout.split('commit: ')[1].strip()}" == f"{hub.url}/tester/tiny-yarn/commit/{commit.oid}"

        # a second push to a new branch, with a message; the existing repo is reused, the branch created
        proc = run_push(str(folder), "tester/tiny-yarn", "--revision", "long-ctx", "--commit-message", "v2 card",
                        endpoint=hub.url, token="hf_secret", home=tmp_path / "hf_home")
        assert proc.returncode == 0, proc.stderr
        assert f"{hub.url}/tester/tiny-yarn/tree/long-ctx" in proc.stdout
        assert [c.branch for c in repo.commits] == ["main", "long-ctx"]
        assert repo.commits[1].summary == "v2 card"
        assert ("POST", "/api/repos/create") in hub.requests and hub.requests.count(("POST", "/api/repos/create")) == 1


def test_include_checkpoints_sends_them_when_asked(folder, tmp_path):
    with FakeHub() as hub:
        proc = run_push(str(folder), "tiny-yarn", "--include-checkpoints", endpoint=hub.url, token=hub.token,
                        home=tmp_path / "hf_home")
        assert proc.returncode == 0, proc.stderr
        files = set(hub.repos["tester/tiny-yarn"].commits[0].files)  # a bare name goes to the token's user
    assert files == MODEL_FILES | (TRAINING_LEFTOVERS - {".DS_Store"})


# --------------------------------------------------------------------------------------------------------------------
# the card names the repo it is pushed to


def test_push_points_the_cards_loading_code_at_the_repo_id(folder, tmp_path, capsys):
    """A card rendered without --repo-id names the folder; push updates it in place to name the repo, says so, and
    uploads that text (the folder and the Hub hold the same card)."""
    write_card(folder)  # loading code: from_pretrained("tiny-yarn")
    before = (folder / "README.md").read_text()
    assert 'from_pretrained("tiny-yarn"' in before and "tester/long-yarn" not in before

    assert main(["push", str(folder), "tester/long-yarn", "--dry-run"]) == 0
    assert ("note: README.md's loading code names 'tiny-yarn'; push updates it in place to name 'tester/long-yarn'"
            in capsys.readouterr().out)
    assert (folder / "README.md").read_text() == before  # a dry run changes nothing

    with FakeHub() as hub:
        proc = run_push(str(folder), "long-yarn", endpoint=hub.url, token=hub.token, home=tmp_path / "h")
        assert proc.returncode == 0, proc.stderr
        assert "named 'tiny-yarn' in its loading code; updated it in place to name 'tester/long-yarn'" in proc.stdout
        uploaded = hub.repos["tester/long-yarn"].commits[0].files["README.md"].decode()
    assert uploaded == (folder / "README.md").read_text()
    code = uploaded.split("```python")[1]
    assert code.count('from_pretrained("tester/long-yarn"') == 2 and '"tiny-yarn"' not in uploaded
    assert "\n# long-yarn\n" in uploaded  # the title too
    assert uploaded.replace("tester/long-yarn", "tiny-yarn").replace("# long-yarn", "# tiny-yarn") == before

    with FakeHub() as hub:  # pushed again to the same repo: nothing to change, no note
        proc = run_push(str(folder), "tester/long-yarn", endpoint=hub.url, token=hub.token, home=tmp_path / "h")
        assert proc.returncode == 0 and "note:" not in proc.stdout
        assert hub.repos["tester/long-yarn"].commits[0].files["README.md"].decode() == uploaded


def test_push_never_changes_a_card_you_wrote(folder, tmp_path):
    mine = "---\nlicense: mit\ntags:\n- mine\n---\n# My model\n\nLoad it with from_pretrained(\"tiny-yarn\").\n"
    (folder / "README.md").write_text(mine)
    with FakeHub() as hub:
        proc = run_push(str(folder), "tester/long-yarn", endpoint=hub.url, token=hub.token, home=tmp_path / "h")
        assert proc.returncode == 0, proc.stderr
        assert "not written by `hf-rope-ext card`" in proc.stderr and "names the repo id" in proc.stderr
        assert hub.repos["tester/long-yarn"].commits[0].files["README.md"].decode() == mine
    assert (folder / "README.md").read_text() == mine


# --------------------------------------------------------------------------------------------------------------------
# dry run


def test_dry_run_lists_exactly_what_would_be_sent(folder, capsys):
    assert main(["push", str(folder), "tester/tiny-yarn", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.split("left out")[0].splitlines()[1:]]
    assert set(listed) == MODEL_FILES and len(listed) == len(MODEL_FILES)
    left_out = out.split("left out")[1]
    for rel in TRAINING_LEFTOVERS:
        assert rel in left_out
    assert "pass --include-checkpoints to send" in left_out
    assert "dry run: nothing was sent" in out
    plan = plan_push(folder)
    assert {rel for rel, _ in plan.files} == MODEL_FILES
    assert plan.total_bytes == sum((folder / rel).stat().st_size for rel in MODEL_FILES)

    assert main(["push", str(folder), "tester/tiny-yarn", "--dry-run", "--exclude", "eval/*"]) == 0
    sent, left_out = capsys.readouterr().out.split("left out")
    assert "eval/perplexity.json" not in sent
    assert [line for line in left_out.splitlines() if "eval/perplexity.json" in line][0].endswith("matches --exclude")


def test_dry_run_contacts_nothing(folder, tmp_path):
    with FakeHub() as hub:
        proc = run_push(str(folder), "tester/tiny-yarn", "--dry-run", endpoint=hub.url, token=hub.token,
                        home=tmp_path / "hf_home")
        assert proc.returncode == 0, proc.stderr
        assert [p for _, p in hub.requests if p != "/api/agent-harnesses"] == []  # huggingface_hub's own probe


# --------------------------------------------------------------------------------------------------------------------
# refusals before anything is sent


def _without(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: _without(f, "model.safetensors"), "no model weights"),
        (lambda f: _without(f, "tokenizer.json"), "no tokenizer"),
        (lambda f: _without(f, "README.md"), "no model card (README.md)"),
        (lambda f: _without(f, "config.json"), "no config.json"),
        (lambda f: (f / "config.json").write_text(json.dumps(
            {k: v for k, v in json.loads((f / "config.json").read_text()).items() if k != "hf_rope_ext"})),
         "has no 'hf_rope_ext' entry"),
        (lambda f: (f / "README.md").write_text("---\nmodel-index: [{results: 3}]\n---\n# card\n"),
         "invalid Hub metadata"),
        (lambda f: (f / "README.md").write_text("# a card without metadata\n"), "no metadata block"),
        (lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace(
            '"max_position_embeddings": 256', '"max_position_embeddings": 512')),
         "rendered for a different extension"),
        (lambda f: (f / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors"}})), "names shards that would not be uploaded"),
    ],
    ids=["weights", "tokenizer", "card", "config", "metadata", "card-metadata", "card-front-matter", "stale-card",
         "shards"],
)
def test_refusals(folder, damage, message, capsys):
    damage(folder)
    plan = plan_push(folder)
    assert not plan.ok and any(message in p for p in plan.problems), plan.problems
    assert main(["push", str(folder), "tester/tiny-yarn"]) == 2
    err = capsys.readouterr().err
    assert "refusing to push" in err and message in err
    assert main(["push", str(folder), "tester/tiny-yarn", "--dry-run"]) == 2
    captured = capsys.readouterr()  # the listing on stdout, the refusal as one error line on stderr
    assert f"refused: {message}" in captured.out or message in captured.out
    assert captured.err.startswith("error: dry run: this push would be refused") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_refuses_offline_before_any_request(folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="offline mode is on"):
        push_folder(folder, "tester/tiny-yarn", token="hf_x", endpoint="http://127.0.0.1:9")


# --------------------------------------------------------------------------------------------------------------------
# unauthenticated, offline, not allowed, failed upload: clear error, nothing half-created


def test_no_token_is_a_clear_error(folder, tmp_path):
    with FakeHub() as hub:
        proc = run_push(str(folder), "tester/tiny-yarn", endpoint=hub.url, token=None, home=tmp_path / "empty_home")
        assert proc.returncode == 2
        assert "not logged in" in proc.stderr and "HF_TOKEN" in proc.stderr
        assert _state_requests(hub) == [] and hub.repos == {}


def test_rejected_token_is_a_clear_error(folder, tmp_path):
    with FakeHub(token="hf_good") as hub:
        proc = run_push(str(folder), "tester/tiny-yarn", endpoint=hub.url, token="hf_bad", home=tmp_path / "h")
        assert proc.returncode == 2
        assert "token was rejected" in proc.stderr and "nothing was created" in proc.stderr
        assert _state_requests(hub) == [] and hub.repos == {}


def test_read_only_token_and_foreign_namespace_are_refused(folder, tmp_path):
    with FakeHub(role="read") as hub:
        proc = run_push(str(folder), "tester/tiny-yarn", endpoint=hub.url, token=hub.token, home=tmp_path / "h")
        assert proc.returncode == 2 and "read-only" in proc.stderr
        assert _state_requests(hub) == []
    with FakeHub() as hub:
        proc = run_push(str(folder), "someone-else/tiny-yarn", endpoint=hub.url, token=hub.token, home=tmp_path / "h")
        assert proc.returncode == 2 and "cannot write to namespace 'someone-else'" in proc.stderr
        assert _state_requests(hub) == [] and hub.repos == {}


def test_unreachable_hub_is_a_clear_error(folder, tmp_path):
    proc = run_push(str(folder), "tester/tiny-yarn", endpoint=f"http://127.0.0.1:{_free_port()}", token="hf_x",
                    home=tmp_path / "h")
    assert proc.returncode == 2
    assert "cannot reach http://127.0.0.1:" in proc.stderr and "nothing was created" in proc.stderr


def test_failed_upload_deletes_the_repo_it_created(folder, tmp_path):
    with FakeHub(fail_commit=422) as hub:
        proc = run_push(str(folder), "tester/tiny-yarn", endpoint=hub.url, token=hub.token, home=tmp_path / "h")
        assert proc.returncode == 2, proc.stdout
        assert "HTTP 422" in proc.stderr and "deleted the repo tester/tiny-yarn" in proc.stderr
        assert hub.deleted == ["tester/tiny-yarn"] and hub.repos == {}


def test_failed_upload_to_a_new_branch_deletes_only_the_branch(folder, tmp_path):
    with FakeHub() as hub:
        assert run_push(str(folder), "tester/tiny-yarn", endpoint=hub.url, token=hub.token,
                        home=tmp_path / "h").returncode == 0
        hub.fail_commit = 422
        proc = run_push(str(folder), "tester/tiny-yarn", "--revision", "exp", endpoint=hub.url, token=hub.token,
                        home=tmp_path / "h")
        assert proc.returncode == 2
        assert "deleted the branch exp" in proc.stderr
        repo = hub.repos["tester/tiny-yarn"]
        assert set(repo.branches) == {"main"} and len(repo.commits) == 1 and hub.deleted == []
