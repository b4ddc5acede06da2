import pytest

#: the token the served plans of these tests are signed with (never on a command line: $COACH_TOKEN)
PLAN_TOKEN = b"a shared secret for the test"


@pytest.fixture(scope="module")
def plan(stem_head_split, tmp_path_factory):
    """(compiled, eager, a plan directory of the split with the whole model, signed with
    ``PLAN_TOKEN``): what ``coach serve`` serves and ``connect(fallback="local")`` runs."""
    cm, m = stem_head_split
    d = tmp_path_factory.mktemp("plan")
    cm.save(d, whole=True, key=PLAN_TOKEN)
    return cm, m, d
