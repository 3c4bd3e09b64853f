"""Label selectors of parent operations, matched against Machines as the API server matches them."""

import pytest

from unbounded_agent.fleet import selector
from unbounded_agent.reasons import OpsError


@pytest.mark.parametrize("sel,labels,expected", [
    ({}, {"pool": "blue"}, True),  # empty: every Machine
    ({"matchLabels": {"pool": "blue"}}, {"pool": "blue", "zone": "a"}, True),
    ({"matchLabels": {"pool": "blue"}}, {"pool": "green"}, False),
    ({"matchLabels": {"pool": "blue"}}, {}, False),
    ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, {"zone": "b"}, True),
    ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}, {}, False),
    ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, {}, True),
    ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, {"zone": "a"}, False),
    ({"matchExpressions": [{"key": "canary", "operator": "Exists"}]}, {"canary": ""}, True),
    ({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}, {"canary": "x"}, False),
    ({"matchLabels": {"pool": "blue"}, "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
     {"pool": "blue", "zone": "b"}, False),
])
def test_matches_like_the_api_server(sel, labels, expected):
    selector.check(sel)
    assert selector.matches(sel, labels) is expected


@pytest.mark.parametrize("sel", [
    "pool=blue", {"matchLabels": {"pool": 1}}, {"matchExpressions": [{"operator": "Exists"}]},
    {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]},
    {"matchExpressions": [{"key": "a", "operator": "In"}]},
    {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]},
])
def test_selectors_the_api_server_would_refuse_are_invalid(sel):
    with pytest.raises(OpsError):
        selector.check(sel)


def test_describe_writes_it_as_kubectl_l_would():
    sel = {"matchLabels": {"pool": "blue"}, "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]},
                                                                 {"key": "canary", "operator": "DoesNotExist"}]}
    assert selector.describe(sel) == "pool=blue,zone notin (a),!canary"
    assert selector.describe({}) == "(every Machine)"
