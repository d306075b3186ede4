"""Deploy options are checked when a deploy is submitted: unknown, invalid and inapplicable ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.coordinator_role import DEPLOY_OPTIONS, check_deploy_options


@pytest.mark.parametrize(
    ("source", "rollout", "options", "message"),
    [
        ("minilm", "replace", {"segmentaton": "block"}, "options.segmentaton is not a deploy option; known options: block_prefix"),
        ("minilm", "replace", {"block_size": 2}, 'options.block_size applies only with options.segmentation "block"'),
        ("minilm", "replace", {"segmentation": "block", "block_size": 0}, "options.block_size is 0"),
        ("minilm", "replace", {"segmentation": "blocks"}, "options.segmentation is 'blocks'"),
        ("minilm", "replace", {"canary_weight": 0.5}, 'options.canary_weight applies only to strategy "canary"'),
        ("minilm", "replace", {"canary_max_p99_ms": 50}, 'options.canary_max_p99_ms applies only to strategy "canary"'),
        ("minilm", "canary", {"canary_weight": 1.5}, "options.canary_weight is 1.5; use a number above 0 and at most 1"),
        ("minilm", "canary", {"canary_min_requests": 2.5}, "canary_min_requests is 2.5"),
        ("minilm", "replace", {"max_stages": 0}, "options.max_stages is 0"),
        ("minilm", "replace", {"split_depth": 1}, "options.split_depth applies only to exported: sources"),
        ("exported:model.pt2", "replace", {}, "needs an absolute path on the coordinator"),
        ("hf:/no/such/model-dir", "replace", {}, "/no/such/model-dir does not exist on the coordinator"),
    ],
)
def test_deploy_option_rejected(source: str, rollout: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_deploy_options(source, rollout, options)
    assert message in str(caught.value)


def test_deploy_options_accepted(tmp_path: Path) -> None:
    check_deploy_options("minilm", "replace", {})
    check_deploy_options("minilm", "replace", {"segmentation": "block", "block_size": 2, "block_prefix": "encoder.layer."})
    check_deploy_options("minilm", "canary", {"canary_weight": 0.2, "canary_max_p99_ms": 50, "canary_min_requests": 3})
    check_deploy_options(f"hf:{tmp_path}", "replace", {"max_stages": 2})
    check_deploy_options(f"exported:{tmp_path}", "replace", {"split_depth": 1})
    assert set(DEPLOY_OPTIONS) >= {"max_stages", "segmentation", "canary_weight", "split_prefix"}
