"""The registries of distrec's extension points (policies, PEFT methods, losses): a name ->
entry mapping that refuses a name twice. Each entry is a frozen dataclass with a `name`."""

from __future__ import annotations


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # for messages: "policy", "PEFT method", "loss"

    def register(self, entry):
        if entry.name in self:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self[entry.name] = entry
        return entry

    def describe(self, what=lambda entry: entry.doc) -> str:
        """'name: what it is; ...' in registration order, for --help-config."""
        return "; ".join(f"{name}: {what(entry)}" for name, entry in self.items())
