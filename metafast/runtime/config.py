"""The config dataclass every job shares: checks that name the field and what was expected, and the
round trip through a checkpoint (or config.json) that refuses keys it does not know."""
import dataclasses
import math
from typing import Iterable, Tuple

DEVICES = ("cpu", "cuda", "auto")


@dataclasses.dataclass
class JobConfig:
    """Base of the jobs' configs (subclass as a dataclass and call the ``check_*`` helpers in ``validate``)."""

    def validate(self) -> "JobConfig":
        return self

    def check_ints(self, minimums: Iterable[Tuple[str, int]]) -> None:
        for name, minimum in minimums:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    def check_positive(self, names: Iterable[str]) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")

    def check_bools(self, names: Iterable[str]) -> None:
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def check_device(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The config saved in a checkpoint; unknown keys are an error, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)
