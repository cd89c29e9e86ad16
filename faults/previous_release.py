"""`python -m faults.previous_release`: the product's worker (`python -m worker`, unchanged)
with the newest release's patch id refused, for the rolling-deploy scenario only.

Refusing it is what the SDK's patch activation callback is for: a run this worker starts
records the markers the release before recorded (for 0.7, the eleven ids of 0.6 instead of
`release-0.7`), as tests/test_versioning.py's runs "like 0.6" do in-process. So the v1
workers of the scenario really start runs a release behind the v2 workers that finish
them, and the suite proves those replay and move on.
"""

from __future__ import annotations

import functools

from temporalio.worker import PatchActivationInput

import worker
from workflows.features import RELEASES

NEWEST_RELEASE = RELEASES[0][0]


def as_the_release_before(patch: PatchActivationInput) -> bool:
    return patch.patch_id != NEWEST_RELEASE


if __name__ == "__main__":
    # `run_worker` builds its referrals worker through this module attribute.
    worker.build_worker = functools.partial(
        worker.build_worker, patch_activation_callback=as_the_release_before
    )
    worker.main()
