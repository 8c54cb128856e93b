"""Who is here: per-library presence of users, as the reference's `Presence` keeps it.

A user's presence is keyed by user id (one entry however many devices), holds the profile the
app's profile source returned, and the latest `presence`/`internal` values and replica id.
Pure state; the library decides when a user has left and what to broadcast.
"""

from __future__ import annotations

from typing import Any


class PresenceState:
    def __init__(self) -> None:
        self._users: dict[str, dict[str, Any]] = {}

    def set(
        self,
        user_id: str,
        replica_id: str,
        presence: Any,
        internal: dict[str, Any] | None,
        profile: Any,
    ) -> dict[str, Any]:
        """Merge an update into the user's entry; returns the `UserInfo` clients receive."""
        entry = self._users.get(user_id)
        if entry is None:
            entry = {
                "id": user_id,
                "replicaId": replica_id,
                "profile": profile,
                "presence": presence,
                "internal": internal if internal is not None else {},
            }
            self._users[user_id] = entry
        else:
            entry["replicaId"] = replica_id
            entry["presence"] = presence
            if internal is not None:
                entry["internal"] = internal
            if profile is not None:
                entry["profile"] = profile
        return entry

    def get(self, user_id: str) -> dict[str, Any] | None:
        return self._users.get(user_id)

    def remove(self, user_id: str) -> dict[str, Any] | None:
        return self._users.pop(user_id, None)

    def all(self) -> dict[str, dict[str, Any]]:
        return self._users

    def replica_ids(self) -> list[str]:
        return [entry["replicaId"] for entry in self._users.values()]

    def clear(self) -> None:
        self._users.clear()

    def __len__(self) -> int:
        return len(self._users)
