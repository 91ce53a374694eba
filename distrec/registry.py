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

    def check(self, name: str, key: str) -> None:
        """A config value naming an entry: refused with the registered names (and the
        nearest one) when it names none. Read when the config is built, not at import, so an
        entry registered later (a plugin, a test) is accepted."""
        if name not in self:
            from distrec.config import nearest

            raise ValueError(f"{key}: expected one of {' | '.join(map(repr, self))}, got {name!r}"
                             f"{nearest(str(name), list(self))}")

    def describe(self, what=lambda entry: entry.doc) -> str:
        """'name: what it is; ...' in registration order, for --help-config."""
        return "; ".join(f"{name}: {what(entry)}" for name, entry in self.items())
