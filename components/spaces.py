"""A DigitalOcean Spaces bucket for the backups (postgres.backup.repository.type: spaces), and
the key pgBackRest reaches it with; the program makes both.

DigitalOcean makes a Spaces key from the API token, but a bucket only through Spaces' own S3 API,
with a Spaces key: so a full-access key (kept in the stack; the bucket's refresh and delete need it
too) gives an explicit provider the credentials the bucket needs, and the members get a second key
that may only read and write this one bucket. Each key's secret half exists once, in the stack
(DigitalOcean shows it only when the key is made). See README "Backups".
"""
from __future__ import annotations

import re

import pulumi
import pulumi_digitalocean as do

from .pgconfig import Repository


def bucket_name(repo: Repository) -> str:
    """The bucket's name: the setting's, or one from the project and stack (a Spaces name is
    unique across all of DigitalOcean's customers in a region)."""
    if repo.bucket:
        return repo.bucket
    return re.sub(r"[^a-z0-9-]", "-", f"{pulumi.get_project()}-{pulumi.get_stack()}-backups".lower())[:63].strip("-")


def bucket(repo: Repository, parent: pulumi.Resource) -> tuple[pulumi.Output, pulumi.Output, pulumi.Output]:
    """The bucket and the members' key: (bucket name, access key id, secret key), as outputs."""
    child = pulumi.ResourceOptions(parent=parent)
    name = bucket_name(repo)
    admin = do.SpacesKey("backup-spaces-admin", name=f"{name}-admin",
                         grants=[do.SpacesKeyGrantArgs(bucket="", permission="fullaccess")], opts=child)
    token = pulumi.Config("digitalocean").get_secret("token")  # None: the plugin reads DIGITALOCEAN_TOKEN
    provider = do.Provider("backup-spaces", token=token, spaces_access_id=admin.access_key,
                           spaces_secret_key=pulumi.Output.secret(admin.secret_key), opts=child)
    made = do.SpacesBucket("backup-bucket", name=name, region=repo.region, acl="private", force_destroy=False,
                           lifecycle_rules=[do.SpacesBucketLifecycleRuleArgs(
                               enabled=True, abort_incomplete_multipart_upload_days=7)],
                           opts=pulumi.ResourceOptions(parent=parent, provider=provider))
    key = do.SpacesKey("backup-spaces-members", name=f"{name}-members",
                       grants=[do.SpacesKeyGrantArgs(bucket=made.name, permission="readwrite")], opts=child)
    return made.name, key.access_key, pulumi.Output.secret(key.secret_key)
