"""Deterministic failure injection for tests and demos.

``--inject`` specs (repeatable):

- ``bitflip:replica=R,step=S`` or ``bitflip:worker=W,step=S``: after step S,
  flip one bit of a parameter on one device of replica R (or of worker W);
- ``kill:worker=W,step=S``: worker W exits abruptly before step S (a lost host);
- ``hang:worker=W,step=S``: worker W stops making progress before step S (a hung
  host: only the heartbeat timeout can tell);
- ``corrupt-persistent:step=S``: once the persistent checkpoint of step S is
  final, alter a byte of one of its files (corruption at rest).
"""

from __future__ import annotations

import dataclasses

_FORMS = {
    "bitflip": "bitflip:replica=R,step=S or bitflip:worker=W,step=S",
    "kill": "kill:worker=W,step=S",
    "hang": "hang:worker=W,step=S",
    "corrupt-persistent": "corrupt-persistent:step=S",
}
EXIT_KILLED = 86  # exit status of a worker killed by injection


@dataclasses.dataclass(frozen=True)
class Injection:
    kind: str  # 'bitflip' | 'kill' | 'hang' | 'corrupt-persistent'
    step: int
    worker: int | None = None
    replica: int | None = None

    def spec(self) -> str:
        """The ``--inject`` text that parses back to this injection."""
        targets = (("worker", self.worker), ("replica", self.replica))
        parts = [f"{k}={v}" for k, v in targets if v is not None]
        return f"{self.kind}:" + ",".join([*parts, f"step={self.step}"])


def parse_injection(text: str) -> Injection:
    kind, _, spec = text.partition(":")
    usage = "; ".join(_FORMS.values())
    if kind not in _FORMS:
        raise ValueError(f"--inject {text!r}: unknown kind {kind!r}; expected {usage}")
    try:
        fields = {k: int(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item)}
    except ValueError:
        raise ValueError(f"--inject {text!r}: expected {_FORMS[kind]}") from None
    allowed = {"bitflip": {"replica", "worker"}, "kill": {"worker"}, "hang": {"worker"}}.get(
        kind, set()
    )
    targets = fields.keys() - {"step"}
    ok = "step" in fields and targets <= allowed and (not allowed or len(targets) == 1)
    if not ok or min(fields.values()) < 0:
        raise ValueError(f"--inject {text!r}: expected {_FORMS[kind]}")
    return Injection(kind, fields["step"], fields.get("worker"), fields.get("replica"))
