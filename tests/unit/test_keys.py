"""The hash fields keys.py builds are the ones the Lua scripts spell themselves."""

from __future__ import annotations

from importlib import resources

from creditgate.domain.charges import Action, ChargeRequest
from creditgate.domain.windows import item_windows
from creditgate.store.keys import (
    RECORD,
    RECORD_FINGERPRINT,
    RECORD_REFUNDED,
    RECORD_REQUEST,
    USAGE_METRICS,
    UsageFields,
)


def _lua(name: str) -> str:
    return resources.files("creditgate.store").joinpath("lua", name).read_text("utf-8")


def test_usage_fields_are_spelled_as_charge_lua_spells_them() -> None:
    charge = _lua("charge.lua")
    assert 'period_id .. "|*users"' in charge
    assert UsageFields.users("p1") == "p1|*users"
    assert 'period_id .. "|" .. user_id .. "|*"' in charge
    assert UsageFields.user_marker("p1", "u1") == "p1|u1|*"
    assert 'period_id .. "|" .. user_id .. "|" .. action .. "|" .. metric' in charge
    assert UsageFields.counter("p1", "u1", "export", "credits") == "p1|u1|export|credits"
    assert UsageFields.counter_prefix("p1", "u1", "export") + "saved" == "p1|u1|export|saved"
    assert UsageFields.period_and_user("p1|u1|export|credits") == ("p1", "u1")
    assert UsageFields.is_users("p1|*users")
    assert not UsageFields.is_users("p1|u1|*")
    command = _lua("command.lua")
    for metric in USAGE_METRICS:
        # a refund's counter is command.lua's; the others are charge.lua's count_usage
        spelled = {
            "refunded": (command, f'summary.action .. "|{metric}"'),
            "held": (charge, 'count_usage(hold_ms and "held" or "credits"'),
            "credits": (charge, 'count_usage(hold_ms and "held" or "credits"'),
        }
        script, spelling = spelled.get(metric, (charge, f'count_usage("{metric}"'))
        counted = spelling in script
        assert counted, metric
    # what a member's credit limit counts, spelled as charge.lua reads it
    for metric in ("credits", "held", "refunded"):
        assert f'prefix .. each .. "|{metric}"' in charge


def test_record_fields_are_spelled_as_the_scripts_spell_them() -> None:
    fields = (RECORD_FINGERPRINT, RECORD, RECORD_REQUEST, RECORD_REFUNDED)
    assert fields == ("fp", "rec", "req", "ref")
    assert 'redis.call("HSET", request_key, "ref"' in _lua("command.lua")
    assert '"fp", fingerprint, "rec", encoded, "req", request_summary' in _lua("charge.lua")
    assert '"fp", fingerprint, "rec", encoded' in _lua("command.lua")


def test_a_contact_opens_its_window_and_its_company_window() -> None:
    request = ChargeRequest.model_validate(
        {
            "request_id": "r-1",
            "org_id": "acme",
            "user_id": "u-1",
            "action": "export",
            "items": [
                {"type": "contact", "id": "c-1", "company_id": "co-9"},
                {"type": "contact", "id": "c-2"},
                {"type": "company", "id": "co-9"},
            ],
            "requested_at": "2026-11-26T10:00:00Z",
        }
    )
    assert item_windows(request) == [
        ("contact:c-1", "company:co-9"),
        ("contact:c-2", None),
        ("company:co-9", None),
    ]
    verification = request.model_copy(update={"action": Action.EMAIL_VERIFICATION})
    assert item_windows(verification)[0] == ("verify:c-1", None)
