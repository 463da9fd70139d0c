"""Push an extended checkpoint to the Hugging Face Hub, after checking that it is complete and explained.

Before anything is sent, :func:`plan_push` checks the folder: model weights, a config.json carrying the
``hf_rope_ext`` entry, a tokenizer, and a model card (README.md with valid metadata, rendered for this config).
Training checkpoints and optimizer states are left out unless asked for. :func:`push_folder` then checks the token
(``whoami``) before creating anything, creates the repo (and branch) only when needed, uploads exactly the planned
files with ``HfApi.upload_folder``, and deletes a repo or branch it created itself if the upload fails. A card
written by ``hf-rope-ext card`` whose loading code names another model id (the folder name, say) is updated in place
to name the repo id before the upload (``PushResult.card_retargeted_from`` says so); a card you wrote yourself is
never changed.

    from hf_rope_ext.hub import plan_push, push_folder
    print(plan_push("out/smollm2-yarn-16k").describe())         # what would be sent (a dry run)
    result = push_folder("out/smollm2-yarn-16k", "me/smollm2-yarn-16k", private=True)
    print(result.url)
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .patching import META_KEY

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "tf_model.h5", "flax_model.msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json",
    "tiktoken.model",
)
"""Any one of these makes a loadable tokenizer (next to tokenizer_config.json and friends)."""

CHECKPOINT_DIRS = ("checkpoint-*", "global_step*", "runs", "wandb", "lightning_logs", "mlruns", "__pycache__")
"""Folders a training run leaves behind (Trainer / accelerate / DeepSpeed / loggers): never part of the model."""
CHECKPOINT_FILES = (
    "optimizer.pt", "optimizer.bin", "optimizer*.pt", "optimizer*.bin", "*optim_states.pt", "scheduler.pt",
    "scheduler*.bin", "scaler.pt", "rng_state*.pth", "random_states_*.pkl", "trainer_state.json",
    "training_args.bin", "*.distcp", "*.ckpt",
)
"""Training state files: optimizer and scheduler states, RNG states, trainer bookkeeping."""


class PushError(ValueError):
    """A push refused or failed, with a message saying what to do; nothing half-created was left behind."""


@dataclass
class PushPlan:
    """What ``push`` would send from a folder, what it leaves out, and why it would refuse."""

    folder: Path
    files: list[tuple[str, int]] = field(default_factory=list)
    """(path relative to the folder, size in bytes) of every file to upload, sorted."""
    excluded: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of files that stay local."""
    problems: list[str] = field(default_factory=list)
    """Reasons to refuse; empty when the folder can be pushed."""
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    card_model_id: str | None = None
    """The model id the loading code of an hf-rope-ext card names (None: no card, or not written by hf-rope-ext)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self, repo_id: str | None = None, revision: str | None = None, private: bool = False) -> str:
        """Human-readable listing (what ``--dry-run`` prints)."""
        target = f" to {repo_id} (revision {revision or 'main'}, {'private' if private else 'public'} if created)" \
            if repo_id else ""
        lines = [f"would upload {len(self.files)} files ({_fmt_size(self.total_bytes)}){target}:"]
        width = max((len(p) for p, _ in self.files), default=0)
        lines += [f"  {path:<{width}}  {_fmt_size(size):>10}" for path, size in self.files]
        if self.excluded:
            lines.append(f"left out ({len(self.excluded)}):")
            width = max(len(p) for p, _ in self.excluded)
            lines += [f"  {path:<{width}}  {reason}" for path, reason in self.excluded]
        lines += [f"warning: {w}" for w in self.warnings]
        if repo_id and self.card_model_id and self.card_model_id != repo_id and self.ok:
            target = repo_id if "/" in repo_id else f"<your user>/{repo_id}"
            lines.append(f"note: README.md's loading code names {self.card_model_id!r}; push updates it in place to "
                         f"name {target!r} before uploading")
        lines += [f"refused: {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class PushResult:
    repo_id: str
    url: str
    """Web URL of the repo (or of the branch, when a revision was given)."""
    commit_url: str
    files: list[str]
    created_repo: bool
    card_retargeted_from: str | None = None
    """The model id README.md named before this push updated it in place to name ``repo_id`` (None: unchanged)."""


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _exclusion(rel: str, include_checkpoints: bool, exclude: Sequence[str]) -> str | None:
    """Why ``rel`` stays local, or None to send it."""
    parts = rel.split("/")
    if any(part.startswith(".") for part in parts):
        return "hidden file"
    if _match(rel, exclude) or _match(parts[-1], exclude):
        return "matches --exclude"
    if parts[-1].endswith(".bak"):
        return "backup file (e.g. README.md.bak kept by `hf-rope-ext card --overwrite`)"
    if include_checkpoints:
        return None
    if any(_match(part, CHECKPOINT_DIRS) for part in parts[:-1]):
        return "training checkpoint / run folder (pass --include-checkpoints to send)"
    if _match(parts[-1], CHECKPOINT_FILES):
        return "optimizer / training state (pass --include-checkpoints to send)"
    return None


def check_repo_id(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a valid Hub model id ("owner/name", or "name" for the token's user), or None. Checked
    offline, with huggingface_hub's own rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id or repo_id.count("/") > 1:
        return f"invalid repo id {repo_id!r}: give owner/name (or name, for the token's user)"
    try:
        validate_repo_id(repo_id if "/" in repo_id else f"user/{repo_id}")
    except HFValidationError as err:
        return f"invalid repo id {repo_id!r}: {' '.join(str(err).split())}"
    return None


def plan_push(
    folder: str | Path, *, include_checkpoints: bool = False, exclude: Sequence[str] = (), repo_id: str | None = None
) -> PushPlan:
    """List the files to upload and check the folder (and ``repo_id`` when given); never touches the network."""
    folder = Path(folder).expanduser()
    plan = PushPlan(folder)
    if repo_id is not None and (problem := check_repo_id(repo_id)):
        plan.problems.append(problem)
    if not folder.is_dir():
        plan.problems.append(f"{folder} is not a folder")
        return plan
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() and not path.exists():
            plan.excluded.append((rel, "broken symlink"))
            continue
        reason = _exclusion(rel, include_checkpoints, exclude)
        if reason:
            plan.excluded.append((rel, reason))
        else:
            plan.files.append((rel, path.stat().st_size))
    sent = {rel for rel, _ in plan.files}
    top = {rel for rel in sent if "/" not in rel}

    # weights
    weights = [rel for rel in top if _match(rel, WEIGHT_PATTERNS) and not rel.startswith("adapter_model")]
    for index in sorted(WEIGHT_INDEXES):
        if index in top:
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                plan.problems.append(f"{index} is not a valid weight index (no 'weight_map')")
                continue
            missing = sorted(shards - sent)
            if missing:
                plan.problems.append(f"{index} names shards that would not be uploaded: {', '.join(missing)}")
    if not weights:
        adapter = " (found only a PEFT adapter: merge it with merge_and_unload() and save the full model)" if any(
            r.startswith("adapter_model") for r in top) else ""
        plan.problems.append(
            f"no model weights in {folder} (expected model.safetensors, model-*-of-*.safetensors with "
            f"model.safetensors.index.json, or pytorch_model.bin){adapter}"
        )

    # config with the extension metadata
    if "config.json" not in top:
        plan.problems.append(f"no config.json in {folder}; save the patched model with save_pretrained")
    else:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            config = {}
            plan.problems.append(f"config.json is not valid JSON ({err})")
        meta = config.get(META_KEY) if isinstance(config, dict) else None
        if isinstance(meta, dict) and "method" in meta:
            plan.meta = meta
        elif config:
            plan.problems.append(
                f"config.json has no '{META_KEY}' entry: this folder was not saved from a model patched by "
                "hf_rope_ext (patch_model + save_pretrained, or `hf-rope-ext patch`), so nothing records the extension"
            )

    # tokenizer
    if not any(rel in top for rel in TOKENIZER_FILES) and not any(rel.endswith(".tiktoken") for rel in top):
        plan.problems.append(
            f"no tokenizer in {folder} (expected one of {', '.join(TOKENIZER_FILES)}); save it next to the model: "
            "tokenizer.save_pretrained(folder)"
        )

    # model card
    _check_card(folder, top, plan)
    return plan


def _check_card(folder: Path, top: set[str], plan: PushPlan) -> None:
    from . import cards

    if "README.md" not in top:
        plan.problems.append(f"no model card (README.md) in {folder}; write one with `hf-rope-ext card {folder}`")
        return
    text = (folder / "README.md").read_text(encoding="utf-8")
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text)
    except Exception as err:  # noqa: BLE001 - any parse failure means invalid metadata
        plan.problems.append(f"README.md has invalid Hub metadata: {err}")
        return
    if not text.lstrip().startswith("---") or not card.data.to_dict():
        plan.problems.append(f"README.md has no metadata block; re-run `hf-rope-ext card {folder}`")
        return
    marker = cards.read_marker(text)
    if marker is None:
        plan.warnings.append("README.md was not written by `hf-rope-ext card`; make sure it states the method, "
                             "its parameters and the lengths, and that its loading code names the repo id")
        return
    plan.card_model_id = cards.read_model_id(text) or folder.resolve().name
    if plan.meta and marker != cards.fingerprint(plan.meta):
        plan.problems.append(
            f"README.md was rendered for a different extension ({marker.split(' parameters=')[0]}) than config.json "
            f"({cards.fingerprint(plan.meta).split(' parameters=')[0]}); re-run `hf-rope-ext card {folder}`"
        )


# --------------------------------------------------------------------------------------------------------------------
# the network part

def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx", "requests"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(module, attr, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def _explain(err: BaseException, endpoint: str, doing: str) -> str:
    """One line a user can act on, from a huggingface_hub / transport exception."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        detail = getattr(err, "server_message", None) or (str(err).strip().splitlines() or [""])[0]
        if status == 401:
            return (f"{doing}: the token was rejected by {endpoint} (HTTP 401). Log in again with `hf auth login` "
                    "or set a valid HF_TOKEN")
        if status == 403:
            return f"{doing}: permission denied by {endpoint} (HTTP 403): {detail}"
        return f"{doing}: {endpoint} answered HTTP {status}: {detail}"
    if isinstance(err, _transport_errors()):
        return f"{doing}: cannot reach {endpoint} ({type(err).__name__}: {err}). Check the network or HF_ENDPOINT"
    return f"{doing}: {type(err).__name__}: {err}"


def _split_repo_id(repo_id: str, user: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = check_repo_id(repo_id)
    if problem:
        raise PushError(problem)
    full = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    try:
        validate_repo_id(full)
    except HFValidationError as err:
        raise PushError(f"invalid repo id {repo_id!r}: {err}") from None
    return full


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    include_checkpoints: bool = False,
    exclude: Sequence[str] = (),
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Check ``folder`` and upload it to the Hub model repo ``repo_id`` (created if needed).

    Args:
        folder: a saved extended model with its tokenizer and card (see :func:`plan_push`).
        repo_id: "owner/name" (or "name" for the token's user).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main if missing); default main.
        commit_message: default "Upload <method> x<factor> extended model (<orig> -> <new> tokens)".
        include_checkpoints: also send training checkpoints and optimizer states.
        exclude: extra fnmatch patterns (relative paths or file names) to leave out.
        token: Hub token; default the usual places (HF_TOKEN, then the `hf auth login` token file).
        endpoint: Hub URL; default HF_ENDPOINT or https://huggingface.co.

    Raises:
        PushError: the folder is incomplete, the user is offline / not logged in / not allowed, or the upload failed
            (a repo or branch created by this call is deleted again).
    """
    plan = plan_push(folder, include_checkpoints=include_checkpoints, exclude=exclude)
    if not plan.ok:
        raise PushError("refusing to push:\n  - " + "\n  - ".join(plan.problems))
    for warning in plan.warnings:
        logger.warning(warning)

    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    if offline:
        raise PushError("offline mode is on (HF_HUB_OFFLINE=1): unset it to push; nothing was sent")
    token = token or get_token()
    if not token:
        raise PushError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN; nothing was sent")
    api = HfApi(endpoint=endpoint, token=token)
    endpoint = api.endpoint
    try:
        who = api.whoami(token=token)
    except Exception as err:  # noqa: BLE001 - every failure here is reported the same way
        raise PushError(_explain(err, endpoint, "checking the token") + "; nothing was created") from err
    user = who.get("name", "")
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError(f"the token of {user!r} is read-only: create a write token at "
                        f"{endpoint}/settings/tokens; nothing was created")
    repo_id = _split_repo_id(repo_id, user)
    namespace = repo_id.split("/")[0]
    allowed = {user, *(o.get("name") for o in who.get("orgs") or [] if isinstance(o, dict))}
    if who.get("type", "user") == "user" and namespace not in allowed:
        raise PushError(f"the token of {user!r} cannot write to namespace {namespace!r} (yours: "
                        f"{', '.join(sorted(a for a in allowed if a))}); nothing was created")

    meta = plan.meta
    commit_message = commit_message or (
        f"Upload {meta.get('method')} ×{meta.get('factor'):g} extended model "
        f"({meta.get('original_max_position_embeddings')} -> {meta.get('max_position_embeddings')} tokens)"
        if isinstance(meta.get("factor"), (int, float)) else "Upload extended model"
    )
    retargeted = _retarget_card(plan, repo_id)
    created_repo = created_branch = False
    try:
        exists = api.repo_exists(repo_id, token=token)
        if not exists:
            api.create_repo(repo_id, private=private, exist_ok=True, token=token)
            created_repo = True
        elif private:
            logger.warning("%s already exists: --private does not change its visibility", repo_id)
        if revision and revision != "main":
            try:
                api.create_branch(repo_id, branch=revision, token=token)
                created_branch = True
            except HfHubHTTPError as err:
                if err.response is None or err.response.status_code != 409:  # 409: the branch exists
                    raise
        files = [rel for rel, _ in plan.files]
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(plan.folder),
            allow_patterns=[glob.escape(rel) for rel in files],
            commit_message=commit_message,
            revision=revision,
            token=token,
        )
    except BaseException as err:
        cleanup = _undo(api, repo_id, revision, created_repo, created_branch, token)
        if isinstance(err, Exception):
            raise PushError(_explain(err, endpoint, f"pushing to {repo_id}") + cleanup) from err
        raise
    url = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision and revision != "main" else "")
    return PushResult(repo_id, url, getattr(info, "commit_url", str(info)), files, created_repo, retargeted)


def _retarget_card(plan: PushPlan, repo_id: str) -> str | None:
    """Make the loading code of an hf-rope-ext card name ``repo_id`` (README.md updated in place, so the folder and
    the Hub hold the same card); returns the model id it named before, or None when nothing changed."""
    from . import cards

    if plan.card_model_id is None or plan.card_model_id == repo_id:
        return None
    path = plan.folder / cards.CARD_FILE
    text, old = cards.retarget_card(path.read_text(encoding="utf-8"), repo_id, plan.folder.resolve().name)
    if old is not None:
        path.write_text(text, encoding="utf-8")
        logger.info("%s: the loading code named %r; updated in place to name %r", path, old, repo_id)
    return old


def _undo(api: Any, repo_id: str, revision: str | None, created_repo: bool, created_branch: bool, token: str) -> str:
    """Delete what this push created; returns a sentence for the error message."""
    try:
        if created_repo:
            api.delete_repo(repo_id, token=token, missing_ok=True)
            return f"; deleted the repo {repo_id} this push had created"
        if created_branch:
            api.delete_branch(repo_id, branch=revision, token=token)
            return f"; deleted the branch {revision} this push had created"
    except Exception as err:  # noqa: BLE001 - report, do not mask the original error
        what = f"repo {repo_id}" if created_repo else f"branch {revision} of {repo_id}"
        return f"; could NOT delete the {what} this push created ({err}): remove it by hand"
    return ""


__all__ = ["plan_push", "push_folder", "PushPlan", "PushResult", "PushError", "CHECKPOINT_DIRS", "CHECKPOINT_FILES"]
