"""Request and response bodies of the fleet API (pydantic; they are the OpenAPI schema at /docs).

Requests are strict: unknown fields, wrong types and names outside the allowed alphabet are refused (a typo in a
field name is an error, not a silent no-op). Every operator request that changes something carries a ``reason``:
one line, written to the audit log.

Example:
    >>> GroupRequest.model_validate({"name": "line-1", "reason": "new line"}).description
    ''
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from edgepeft.delta.manifest import NAME_PATTERN

MAX_LIST = 100
SHA256_PATTERN = "^[0-9a-f]{64}$"
# Tags are labels such as "site=berlin" or "hw:rev2": names plus '=', ':' and '/'.
TAG_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:=/-]{0,127}$"


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must say something, not only spaces")
    return text


Name = Annotated[str, Field(pattern=f"^{NAME_PATTERN}$", description="1-128 letters, digits, '.', '_' or '-', "
                                                                     "starting with a letter or digit.")]
Tag = Annotated[str, Field(pattern=TAG_PATTERN, description="A label such as site=berlin.")]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN, description="64 lower-case hex digits.")]
# One line with at least one visible character: the pattern says so itself (not only the validator), so the
# OpenAPI schema that clients and schemathesis read describes exactly what is accepted.
Reason = Annotated[str, Field(min_length=1, max_length=1000,
                              pattern="^[^\\x00-\\x1f\\x7f]*[^\\s\\x00-\\x1f\\x7f][^\\x00-\\x1f\\x7f]*$",
                              description="Why: one line, written to the audit log."), AfterValidator(_not_blank)]
Scope = Literal["read", "publish", "deploy", "admin"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenRequest(Strict):
    name: Name = Field(..., description="Who or what will use the token, e.g. ci-publisher.")
    scopes: list[Scope] = Field(..., min_length=1, max_length=4)
    reason: Reason


class BaseRequest(Strict):
    name: Name = Field(..., description="The base's name, e.g. tiny.")
    sha256: Sha256 = Field(..., description="The sha256 bundles bind to (their manifest's base.sha256; a model "
                                            "card's state_sha256).")
    reason: Reason


class GroupRequest(Strict):
    name: Name
    description: str = Field("", max_length=1000)
    reason: Reason


class EnrolRequest(Strict):
    device_id: Name
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_LIST)
    groups: list[Name] = Field(default_factory=list, max_length=MAX_LIST, description="Existing groups.")
    assets: list[Name] = Field(default_factory=list, max_length=MAX_LIST, description="Assets it monitors.")
    bases: list[Sha256] = Field(default_factory=list, max_length=MAX_LIST, description="Registered bases it holds.")
    reason: Reason


class DeviceUpdate(Strict):
    """The lists given replace the device's; the others stay as they are."""

    tags: list[Tag] | None = Field(None, max_length=MAX_LIST)
    groups: list[Name] | None = Field(None, max_length=MAX_LIST)
    assets: list[Name] | None = Field(None, max_length=MAX_LIST)
    bases: list[Sha256] | None = Field(None, max_length=MAX_LIST)
    reason: Reason

    @model_validator(mode="after")
    def _something(self) -> DeviceUpdate:
        if self.tags is None and self.groups is None and self.assets is None and self.bases is None:
            raise ValueError("nothing to change: give tags, groups, assets or bases")
        return self


class ReasonRequest(Strict):
    reason: Reason


class InventoryReport(Strict):
    """What a device reports it runs (replaces what the registry holds for it)."""

    assets: list[Name] = Field(..., max_length=MAX_LIST)
    bases: list[Sha256] = Field(..., max_length=MAX_LIST)


class TokenOut(BaseModel):
    id: int
    name: str
    scopes: list[str]
    created_at: str
    created_by: str
    revoked_at: str | None


class NewToken(BaseModel):
    token: str = Field(..., description="The operator token: shown once, only its hash is kept.")
    record: TokenOut


class BaseOut(BaseModel):
    name: str
    sha256: str
    registered_at: str


class GroupOut(BaseModel):
    name: str
    description: str
    created_at: str
    devices: int


class DeviceOut(BaseModel):
    device_id: str
    enrolled_at: str
    enrolled_by: str
    updated_at: str
    tags: list[str]
    groups: list[str]
    assets: list[str]
    bases: list[str]


class Enrolled(BaseModel):
    credential: str = Field(..., description="The device's credential: shown once, only its hash is kept.")
    device: DeviceOut


class BundleOut(BaseModel):
    sha256: str = Field(..., description="sha256 of the .edelta file; its name in the catalogue.")
    asset_id: str
    version: str
    release: int
    parent_version: str | None
    base_sha256: str
    method: str
    signer: str
    size_bytes: int
    created_at: str
    expires_at: str | None
    uploaded_at: str
    uploaded_by: str


class AuditOut(BaseModel):
    id: int
    at: str
    actor: str = Field(..., description="operator:NAME#TOKEN_ID, device:ID or cli:USER.")
    action: str
    target: str
    reason: str
    details: dict[str, object]


class ErrorOut(BaseModel):
    error: str = Field(..., description="Error type, e.g. Forbidden.")
    detail: str = Field(..., description="What went wrong and what to do next, on one line.")


# ------------------------------------------------------------------------------------------------ rollouts
class Strategy(Strict):
    """How a rollout proceeds: a canary, then waves; each wave opens only when the previous one is healthy."""

    canary: int = Field(1, ge=1, le=100_000, description="Devices in the canary wave (wave 0).")
    canary_percent: float | None = Field(None, gt=0, le=100, description="Canary size as a share of the "
                                         "target devices instead (rounded up); overrides `canary`.")
    canary_group: Name | None = Field(None, description="The canary is this group's devices among the targets "
                                      "(e.g. lab rigs); overrides `canary` and `canary_percent`.")
    waves: list[float] = Field([25.0, 100.0], min_length=1, max_length=20,
                               description="After the canary, cumulative shares (%) of the remaining devices "
                               "each wave reaches; the last must be 100.")
    max_devices_per_minute: int | None = Field(None, ge=1, le=10_000_000, description="Rate limit on new "
                                               "assignments within a wave (none: a wave is assigned at once).")
    soak_seconds: float = Field(0.0, ge=0, le=30 * 86400, description="How long a wave must stay healthy "
                                "before the next one opens.")
    ab_split: float = Field(0.5, gt=0, lt=1, description="A/B only: the share of devices given bundle_b.")

    @model_validator(mode="after")
    def _waves(self) -> Strategy:
        if any(not 0 < w <= 100 for w in self.waves) or any(b <= a for a, b in zip(self.waves, self.waves[1:],
                                                                                      strict=False)):
            raise ValueError("waves must rise strictly, each in (0, 100]")
        if self.waves[-1] != 100:
            raise ValueError("the last wave must reach 100 (% of the devices)")
        return self


class Gates(Strict):
    """When a device on the new version is unhealthy (compared with its own previous version: its baseline)."""

    min_rows: int = Field(200, ge=1, le=10**9, description="Rows the device must score on the new version "
                          "before a verdict.")
    max_alert_ratio: float = Field(3.0, ge=1, le=1e6, description="Unhealthy when the alert rate exceeds this "
                                   "times the baseline's ...")
    alert_margin: float = Field(0.01, ge=0, le=1, description="... and the baseline plus this margin.")
    max_alert_rate: float = Field(0.2, gt=0, le=1, description="Unhealthy above this alert rate whatever the "
                                  "baseline (and the only rate gate for a device without one).")
    max_q95_ratio: float | None = Field(None, gt=1, le=1e6, description="Unhealthy when the q95 of "
                                        "score/threshold exceeds this times the baseline's (off by default).")
    max_errors: int = Field(0, ge=0, le=10**9, description="Failed score calls tolerated on the new version.")
    max_failures: int = Field(0, ge=0, le=10**6, description="Devices per wave whose install may fail before the "
                              "rollout halts.")


class RolloutRequest(Strict):
    name: Name
    group: Name = Field(..., description="The device group to roll out to.")
    bundle: Sha256 = Field(..., description="The bundle (catalogue sha256) to deploy.")
    bundle_b: Sha256 | None = Field(None, description="A/B test: a second bundle of the same asset for a share "
                                    "(strategy.ab_split) of the devices.")
    strategy: Strategy = Field(default_factory=Strategy)
    gates: Gates = Field(default_factory=Gates)
    reason: Reason


class RolloutAction(Strict):
    reason: Reason


class HealthIn(Strict):
    version: Name
    rows: int = Field(..., ge=0, le=2**62)
    alerts: int = Field(..., ge=0, le=2**62)
    score_q50: float | None = Field(None, ge=0, le=1e12)
    score_q95: float | None = Field(None, ge=0, le=1e12)
    score_q99: float | None = Field(None, ge=0, le=1e12)
    errors: int = Field(0, ge=0, le=2**62)
    since: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _alerts(self) -> HealthIn:
        if self.alerts > self.rows:
            raise ValueError("alerts cannot exceed rows")
        return self


class AssetReport(Strict):
    asset_id: Name
    active_version: Name | None = None
    active_release: int | None = Field(None, ge=0, le=2**62)
    versions: list[Name] = Field(default_factory=list, max_length=64)
    health: HealthIn | None = None


class EventIn(Strict):
    at: str = Field(..., max_length=64)
    kind: Literal["installed", "activated", "rolled_back", "error", "started", "refused"]
    asset_id: Name | None = None
    version: Name | None = None
    detail: str = Field("", max_length=2000)


class DeviceReport(Strict):
    """What a device's agent reports each poll: what it runs, each active version's health, what happened."""

    agent: str = Field("", max_length=128)
    started_at: str | None = Field(None, max_length=64)
    crashes: int = Field(0, ge=0, le=2**31)
    assets: list[AssetReport] = Field(default_factory=list, max_length=MAX_LIST)
    events: list[EventIn] = Field(default_factory=list, max_length=MAX_LIST)


class ReportAnswer(BaseModel):
    poll_seconds: float = Field(..., description="When to poll next (the agent adds jitter).")
