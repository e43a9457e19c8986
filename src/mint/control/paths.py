"""`tinker://<training run>/<segment>/<name>` checkpoint paths, as the Tinker SDK parses them."""

from __future__ import annotations

from dataclasses import dataclass

from mint.errors import MalformedRequest

SEGMENT_BY_KIND = {"training": "weights", "sampler": "sampler_weights"}
KIND_BY_SEGMENT = {segment: kind for kind, segment in SEGMENT_BY_KIND.items()}
PREFIX = "tinker://"


@dataclass(frozen=True)
class CheckpointPath:
    policy_id: str
    kind: str  # "training" or "sampler"
    name: str

    @property
    def segment(self) -> str:
        return SEGMENT_BY_KIND[self.kind]

    def __str__(self) -> str:
        return f"{PREFIX}{self.policy_id}/{self.segment}/{self.name}"


def parse_checkpoint_path(path: str) -> CheckpointPath:
    if not path.startswith(PREFIX):
        raise MalformedRequest(
            f"checkpoint path {path!r} must start with {PREFIX}; use the path a save returned"
        )
    parts = path[len(PREFIX) :].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in KIND_BY_SEGMENT:
        raise MalformedRequest(
            f"checkpoint path {path!r} must look like tinker://<run id>/weights/<name> or "
            f"tinker://<run id>/sampler_weights/<name>"
        )
    return CheckpointPath(policy_id=parts[0], kind=KIND_BY_SEGMENT[parts[1]], name=parts[2])
