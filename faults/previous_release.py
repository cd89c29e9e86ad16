"""`python -m faults.previous_release`: the product's worker (`python -m worker`) as the release
before the newest was, for the rolling-deploy scenario and the rollback test.

Its referral workflow knows neither the newest release's patch id nor the behaviours that
release added, as the older code did not: a run it starts records the markers the release
before recorded (for 0.7, the eleven ids of 0.6 instead of `release-0.7`), and a run started
on the newest release replays on it as on that older code, which is what a rollback past a
patch does (docs/rollout.md). The rest of the code is the newest's.
"""

from __future__ import annotations

from typing import Any

from temporalio import workflow
from temporalio.worker import PatchActivationInput, Worker

with workflow.unsafe.imports_passed_through():
    import worker
    from workflows.features import RELEASES, behaviour_patch_id
    from workflows.models.referral import ReferralInput, ReferralState
    from workflows.referral import ReferralWorkflow

(NEWEST_RELEASE, NEWEST_BEHAVIOURS), *BEFORE = RELEASES


@workflow.defn(name="ReferralWorkflow")
class PreviousReleaseReferral(ReferralWorkflow):
    releases = tuple(BEFORE)

    @workflow.init
    def __init__(self, input: ReferralInput) -> None:
        super().__init__(input)

    @workflow.run
    async def run(self, input: ReferralInput) -> ReferralState:
        return await super().run(input)


def as_the_release_before(patch: PatchActivationInput) -> bool:
    """A new run never records the ids of the behaviours the newest release added (knowing no
    release id after the last, the older code asks for each behaviour's own)."""
    return patch.patch_id not in {behaviour_patch_id(name) for name in NEWEST_BEHAVIOURS}


_build_worker = worker.build_worker


def build_worker(*args: Any, **options: Any) -> Worker:
    """`worker.build_worker`, with this release's referral workflow."""
    newest = worker.ReferralWorkflow
    worker.ReferralWorkflow = PreviousReleaseReferral  # type: ignore[misc]
    try:
        return _build_worker(*args, patch_activation_callback=as_the_release_before, **options)
    finally:
        worker.ReferralWorkflow = newest  # type: ignore[misc]


if __name__ == "__main__":
    # `run_worker` builds its referrals worker through this module attribute.
    worker.build_worker = build_worker
    worker.main()
