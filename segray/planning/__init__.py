"""``segray plan``: a dataset fingerprint and fixed rules -> a training plan with a reason per choice."""

from segray.planning.apply import config_from, make_plan, plan_for
from segray.planning.fingerprint import ClassFingerprint, Fingerprint, fingerprint
from segray.planning.plan import PLAN_FILE, Plan, PlanChoice, plan_uri, read_plan, write_plan
from segray.planning.rules import Machine

__all__ = [
    "PLAN_FILE",
    "ClassFingerprint",
    "Fingerprint",
    "Machine",
    "Plan",
    "PlanChoice",
    "config_from",
    "fingerprint",
    "make_plan",
    "plan_for",
    "plan_uri",
    "read_plan",
    "write_plan",
]
