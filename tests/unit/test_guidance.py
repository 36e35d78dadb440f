"""Guidance-interval arithmetic (imagegenx.guidance): which steps are guided, rows per image."""
from __future__ import annotations

import pytest

from imagegenx.guidance import guided, guided_steps, parse_interval, reserved_rows, rows_at, trajectory_rows


def test_steps_inside_the_interval_are_guided() -> None:
    assert [guided(7.5, (0.0, 0.4), i, 20) for i in range(20)] == [True] * 8 + [False] * 12
    assert [i for i in range(20) if guided(7.5, (0.1, 0.6), i, 20)] == list(range(2, 12))
    assert guided_steps(7.5, (0.0, 1.0), 20) == 20
    assert guided_steps(7.5, (0.0, 0.6), 20) == 12


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_a_scale_of_at_most_one_is_never_guided(scale: float) -> None:
    assert guided_steps(scale, (0.0, 1.0), 20) == 0
    assert trajectory_rows(scale, (0.0, 1.0), 20) == 20


def test_rows_per_image() -> None:
    # The figures of the issue: 40 rows with guidance throughout, 28 with a cut after 40%.
    assert trajectory_rows(7.5, (0.0, 1.0), 20) == 40
    assert trajectory_rows(7.5, (0.0, 0.4), 20) == 28
    assert trajectory_rows(7.5, (0.0, 0.6), 20) == 32
    assert trajectory_rows(7.5, (0.1, 0.6), 20) == 30
    assert [rows_at(7.5, (0.5, 1.0), i, 4) for i in range(4)] == [1, 1, 2, 2]


def test_reserved_rows_never_rise() -> None:
    for interval in ((0.0, 0.4), (0.1, 0.6), (0.5, 1.0), (0.0, 1.0)):
        reserved = [reserved_rows(7.5, interval, i, 20) for i in range(21)]
        assert reserved == sorted(reserved, reverse=True)
        assert all(reserved_rows(7.5, interval, i, 20) >= rows_at(7.5, interval, i, 20) for i in range(20))
    assert reserved_rows(7.5, (0.5, 1.0), 0, 10) == 2  # a later guided step is reserved from the start


@pytest.mark.parametrize(("text", "want"), [("0,1", (0.0, 1.0)), (" 0, 0.4 ", (0.0, 0.4)), ("[0.1,0.6]", (0.1, 0.6))])
def test_parse_interval(text: str, want: tuple[float, float]) -> None:
    assert parse_interval(text) == want


@pytest.mark.parametrize("text", ["", "0", "0,1,2", "a,b", "0.5,0.5", "0.6,0.1", "-0.1,1", "0,1.1"])
def test_bad_intervals_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="must"):
        parse_interval(text)


def test_an_unset_interval_takes_the_server_default() -> None:
    from imagegenx.engine.base import Sample
    from imagegenx.pipeline import plan
    from imagegenx.request_state import RequestState
    from imagegenx.schemas import GenerateRequest, Limits

    limits = Limits(guidance_interval=(0.0, 0.4))
    req = GenerateRequest.model_validate({"prompt": "x"}, context={"limits": limits})
    assert req.guidance_interval == (0.0, 0.4)
    # What the API sends on is explicit, so the worker runs the interval the API resolved.
    sent = req.model_dump(mode="json")
    assert sent["guidance_interval"] == [0.0, 0.4]
    again = GenerateRequest.model_validate(sent, context={"limits": Limits()})
    assert again.resolved_interval() == (0.0, 0.4)
    own = GenerateRequest.model_validate({"prompt": "x", "guidance_interval": [0.1, 0.6]},
                                         context={"limits": limits})
    assert own.guidance_interval == (0.1, 0.6)
    assert Sample("x", 1).guidance_interval == (0.0, 1.0)
    resolved = own.model_copy(update={"seed": 5, "width": 64, "height": 64, "num_images": 2})
    spec, _ = plan([RequestState("j", resolved)])
    assert [s.guidance_interval for s in spec.samples] == [(0.1, 0.6), (0.1, 0.6)]


def test_the_setting_reads_start_end(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from imagegenx.settings import Settings

    monkeypatch.setenv("IMAGEGENX_GUIDANCE_INTERVAL", "0,0.4")
    assert Settings().limits.guidance_interval == (0.0, 0.4)
    monkeypatch.setenv("IMAGEGENX_GUIDANCE_INTERVAL", "0.6,0.4")
    with pytest.raises(ValidationError, match="guidance_interval"):
        Settings()


def test_the_cli_option_sends_two_numbers_or_the_text_as_given() -> None:
    from imagegenx.cli_client import interval_option

    assert interval_option("0,0.4") == [0.0, 0.4]
    assert interval_option("[0.1, 0.6]") == [0.1, 0.6]
    assert interval_option("soon") == "soon"  # the server's 422 names it
    assert interval_option(None) is None
