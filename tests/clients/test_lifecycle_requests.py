"""The SDK's lifecycle requests (clients/resources.py): an update names exactly the fields given in its mask,
tags replace all or change one key at a time, and tag filters take "key=value", "key" or a mapping."""
from __future__ import annotations

import pytest

from reddwarf.client import resources as r


def test_an_update_masks_only_what_is_given():
    req = r.update_instance_request("abc", name="new")
    assert req.instance.name == "instances/abc" and list(req.update_mask.paths) == ["display_name"]
    req = r.update_instance_request("instances/abc", deletion_protection=False)
    assert list(req.update_mask.paths) == ["deletion_protection"] and not req.instance.deletion_protection
    assert list(r.update_instance_request("abc").update_mask.paths) == []  # the server refuses an empty mask


def test_tags_replace_all_or_change_single_keys():
    req = r.update_instance_request("abc", tags={})
    assert list(req.update_mask.paths) == ["tags"] and dict(req.instance.tags) == {}
    req = r.update_instance_request("abc", set_tags={"env": "prod"}, remove_tags=["team", "env"])
    assert list(req.update_mask.paths) == ["tags.env", "tags.team"] and dict(req.instance.tags) == {"env": "prod"}
    with pytest.raises(ValueError):
        r.update_instance_request("abc", tags={"a": "b"}, remove_tags=["c"])
    b = r.update_backup_request("xyz", description="", remove_tags=["old"])
    assert b.backup.name == "backups/xyz" and list(b.update_mask.paths) == ["tags.old", "description"]


def test_tag_filters():
    assert r.tag_filters(["env=prod", "team"]) == ["env=prod", "team"]
    assert r.tag_filters({"env": "prod", "team": None}) == ["env=prod", "team"]
