"""Whether ``compress --push`` can succeed, asked of the Hub before any model is loaded.

A push without a token, with a read-only token, or into a namespace the token may not write to fails at
the very end of a run that can take hours. The account behind the token (``whoami``) answers all three in
one request, so it is asked first; anything it cannot tell (a fine-grained token without a scope entry, a
Hub too old to say) is left for the push itself to find out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import OfflineModeIsEnabled

from swm_hub.core.errors import PushCheckError
from swm_hub.core.hub_http import HTTP_ERRORS, http_status, transport_reason

__all__ = ["check_push_access", "writable_namespaces"]

WRITE_ROLES = frozenset({"write", "admin", "contributor"})
"""Organisation roles that may create and write repositories (``read`` may not)."""


def check_push_access(
    repo_id: str | None, dry_run: bool = False, token: str | None = None, endpoint: str | None = None
) -> None:
    """Refuse a push that cannot succeed: no token, a token the Hub refuses, or no write access to ``repo_id``.

    Without ``repo_id`` the push goes to the token's own namespace, so only the token is checked. A dry run
    needs no token and is not checked.

    Raises:
        PushCheckError: what is missing, and how to fix it; the token is never part of the message.
    """
    if dry_run:
        return
    where = repo_id or "the Hub"
    token = token or get_token()
    if not token:
        raise PushCheckError(
            where,
            "no Hugging Face token found: log in with `hf auth login`, or set HF_TOKEN to a token with write access",
        )
    account = _whoami(HfApi(endpoint=endpoint), token, where)
    if _token_role(account) == "read":
        raise PushCheckError(
            where, "the token is read-only: create a token with write access and log in with it"
        )
    if repo_id is None or "/" not in repo_id:
        return
    namespace = repo_id.split("/", 1)[0]
    writable = writable_namespaces(account)
    if writable is not None and namespace not in writable:
        raise PushCheckError(
            where,
            f"the token (user {account.get('name')}) may not write to the namespace {namespace!r}; it may write "
            f"to {', '.join(sorted(writable)) or 'none'}",
        )


def _whoami(api: HfApi, token: str, where: str) -> Mapping[str, Any]:
    try:
        account: Mapping[str, Any] = api.whoami(token=token)
    except OfflineModeIsEnabled:
        raise PushCheckError(
            where, "huggingface_hub is in offline mode (HF_HUB_OFFLINE=1): unset it"
        ) from None
    except HTTP_ERRORS as error:
        raise PushCheckError(where, _whoami_failure(error, api.endpoint)) from None
    return account


def _whoami_failure(error: BaseException, endpoint: str) -> str:
    status = http_status(error)
    if status == 401:
        return "the Hub refused the token (HTTP 401): log in again with `hf auth login` or set HF_TOKEN to a valid token"
    if status is not None:
        return f"the Hub answered HTTP {status} when asked who the token belongs to: try again later"
    return (
        transport_reason(error, endpoint)
        or f"the Hub at {endpoint} could not be asked ({type(error).__name__})"
    )


def _token_role(account: Mapping[str, Any]) -> str | None:
    role = account.get("auth", {}).get("accessToken", {}).get("role")
    return role if isinstance(role, str) else None


def writable_namespaces(account: Mapping[str, Any]) -> set[str] | None:
    """The user and organisations the token may create repositories in; None when the answer cannot tell.

    A fine-grained token lists its scopes: a namespace counts when a scope on it, or on a repository in it,
    includes ``repo.write``.
    """
    user = account.get("name")
    if not isinstance(user, str):
        return None
    orgs = {
        org["name"]
        for org in account.get("orgs", [])
        if isinstance(org, Mapping) and org.get("roleInOrg", "write") in WRITE_ROLES
    }
    if _token_role(account) != "fineGrained":
        return {user, *orgs}
    scoped = account.get("auth", {}).get("accessToken", {}).get("fineGrained", {}).get("scoped")
    if not isinstance(scoped, list):
        return None
    return {
        str(entry.get("entity", {}).get("name")).split("/", 1)[0]
        for entry in scoped
        if isinstance(entry, Mapping) and "repo.write" in entry.get("permissions", [])
    }
