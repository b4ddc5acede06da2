"""Settings records refuse what cannot run, with a message that names it."""

import pytest

from coach_fx.runtime.config import RaySettings


def test_ray_settings():
    assert RaySettings(replicas=3).max_replicas == 3
    assert RaySettings(autoscale=RaySettings.parse_autoscale("2:6")).max_replicas == 6
    with pytest.raises(ValueError, match="MIN:MAX"):
        RaySettings.parse_autoscale("2-6")
    with pytest.raises(ValueError, match="min <= max"):
        RaySettings(autoscale=(3, 1))
    with pytest.raises(ValueError, match="replicas"):
        RaySettings(replicas=0)
