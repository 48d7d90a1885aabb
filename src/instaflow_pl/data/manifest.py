"""The manifest of a generated triples dataset: what produced it, so a rerun can resume or refuse."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from instaflow_pl.errors import UserError
from instaflow_pl.kinds import normalise_kind
from instaflow_pl.predict.work import shard_count, shard_range

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
X0_FORMATS = ("seed", "tensor")
X1_DTYPES = ("fp16", "bf16", "fp32")

# Fields that describe where things came from, not what they are: a moved teacher folder or prompt file is fine.
_INFORMATIONAL = {"teacher", "prompts_source"}


@dataclass(frozen=True)
class Manifest:
    """Everything that decides the bytes of a generated (X0, X1, prompt) dataset.

    Attributes:
        teacher: Folder or hub id of the teacher (informational).
        teacher_kind: ``released`` or ``velocity`` (manifests written before say ``sd`` for ``released``).
        teacher_fingerprint: SHA-256 of the teacher's weights and configs.
        teacher_dtype: Weight dtype the teacher ran in.
        solver: Solver name (scheduler or ODE method).
        steps: Solver steps.
        guidance: Classifier-free guidance weight (<= 1: none).
        seed: Base seed; sample i's noise is drawn from seed + i.
        latent_shape: (C, H, W) of X0 and X1.
        x0_format: ``seed`` (X0 regenerated from its seed) or ``tensor`` (stored).
        x1_dtype: Storage dtype of X1 (and of X0 when stored).
        count: Number of samples.
        shard_size: Samples per shard (the last may hold fewer).
        prompts_sha256: SHA-256 of the prompt list (after limit and repeats).
        prompts_source: The prompt file (informational).
        family: The teacher's model family (:mod:`instaflow_pl.families`): only its models can train on the data.
        max_sequence_length: T5 tokens of the teacher's prompts (SD3, Flux); None for families without T5 and
            manifests written before it was recorded. Models trained on the data read their prompts the same way.
        format_version: Version of this layout.
    """

    teacher: str
    teacher_kind: str
    teacher_fingerprint: str
    teacher_dtype: str
    solver: str
    steps: int
    guidance: float
    seed: int
    latent_shape: list[int]
    x0_format: str
    x1_dtype: str
    count: int
    shard_size: int
    prompts_sha256: str
    prompts_source: str = ""
    family: str = "sd"
    max_sequence_length: int | None = None
    format_version: int = field(default=FORMAT_VERSION)

    @property
    def num_shards(self) -> int:
        """Number of shards the dataset is cut into."""
        return shard_count(self.count, self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Sample indices of ``shard``."""
        return shard_range(shard, self.shard_size, self.count)

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys), so equal manifests are equal bytes."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read a manifest file; a missing or damaged one is a clear error."""
        if not path.is_file():
            raise UserError(f"{path} not found: the folder is not a generated dataset (run pair generation first)")
        try:
            data = json.loads(path.read_text())
            names = {f.name for f in fields(cls)}
            known = {k: v for k, v in data.items() if k in names}
            if "teacher_kind" in known:
                known["teacher_kind"] = normalise_kind(known["teacher_kind"])
            if "max_sequence_length" not in data:  # written before the prompt length was recorded
                known["max_sequence_length"] = _recorded_prompt_length(known.get("family", "sd"))
            return cls(**known)
        except (json.JSONDecodeError, TypeError) as err:
            raise UserError(f"{path} is damaged ({err}); regenerate the dataset into a new folder") from None

    def differences(self, other: Manifest) -> list[str]:
        """Human-readable ``name: ours != theirs`` for every field that changes the data."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name not in _INFORMATIONAL and mine != theirs:
                out.append(f"{f.name}: {mine!r} != {theirs!r}")
        return out


def _recorded_prompt_length(family: str) -> int | None:
    """The prompt length a manifest of ``family`` written before the field existed implies (SD3: 256)."""
    from instaflow_pl.families import FAMILIES

    known = FAMILIES.get(family)
    return None if known is None else known.recorded_prompt_length
