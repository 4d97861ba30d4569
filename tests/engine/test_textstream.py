"""The scheduler's text side without a model: UTF-8 pieces, stop strings, holds, bans.

`TextStream` is fed token ids and byte pieces exactly as the scheduler feeds it; these
tests check what it hands out to be sent and the decisions it returns.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from innkeeper.engine.textstream import MAX_BACKTRACKS, Rollback, TextStream, suffix_prefix


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    """Push each piece as its own token (ids 0, 1, ...) and collect what is ready each time."""
    out = []
    for i, piece in enumerate(pieces):
        stream.push(i, piece)
        out.append(stream.ready())
    return out


# ---- UTF-8 -----------------------------------------------------------------------------------


def test_multibyte_character_split_across_tokens_is_sent_whole() -> None:
    stream = TextStream()
    # "é" is C3 A9; "🙂" is F0 9F 99 82, here split over three tokens.
    sent = feed(stream, [b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x99", b"\x82!"])
    assert sent == ["caf", "é ", "", "", "🙂!"]
    assert stream.text == "café 🙂!"
    assert stream.char_ends == [3, 5, 5, 5, 7]
    assert stream.flush() == ""


def test_flush_turns_an_unfinished_character_into_a_replacement() -> None:
    stream = TextStream()
    assert feed(stream, [b"ok\xe2\x82"]) == ["ok"]
    assert stream.flush() == "\ufffd"
    assert stream.text == "ok\ufffd"


def test_invalid_bytes_are_replaced_not_raised() -> None:
    stream = TextStream()
    assert feed(stream, [b"a\xffb"]) == ["a\ufffdb"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.lists(st.integers(1, 12), max_size=40))
def test_any_byte_split_decodes_like_the_whole(text: str, cuts: list[int]) -> None:
    data = text.encode("utf-8")
    pieces, i = [], 0
    for n in cuts:
        pieces.append(data[i : i + n])
        i += n
    pieces.append(data[i:])
    stream = TextStream()
    sent = "".join(feed(stream, pieces)) + stream.flush()
    assert sent == text == stream.text


# ---- stop strings ----------------------------------------------------------------------------


def test_stop_string_split_across_tokens_is_held_then_cut() -> None:
    stream = TextStream(stop=["\nUser:"])
    assert feed(stream, [b"Hi there", b"\nUs"]) == ["Hi there", ""]
    stream.push(2, b"er: more")
    assert stream.find_stop() == (8, "\nUser:")
    # Nothing of the stop string or what followed it in the same token is sent or kept.
    assert stream.cut_at(8) == ""
    assert stream.text == "Hi there"
    assert stream.emitted == 8


def test_cut_at_sends_the_held_text_before_the_stop() -> None:
    stream = TextStream(stop=["###"])
    assert feed(stream, [b"a #"]) == ["a "]  # "#" could start "###"
    stream.push(1, b"b###c")
    assert stream.find_stop() == (4, "###")
    assert stream.cut_at(4) == "#b"
    assert stream.text == "a #b"


def test_stop_that_starts_in_held_text_then_diverges_is_released() -> None:
    stream = TextStream(stop=["</s>"])
    assert feed(stream, [b"x </"]) == ["x "]  # "</" is held
    stream.push(1, b"b>")
    assert stream.find_stop() is None
    assert stream.ready() == "</b>"
    # A second partial match after the divergence is held again, then found.
    assert feed(stream, [b" <"]) == [" "]
    stream.push(3, b"/s>")
    assert stream.find_stop() == (7, "</s>")
    assert stream.cut_at(7) == ""
    assert stream.text == "x </b> "


def test_earliest_stop_wins_whatever_the_order_of_the_list() -> None:
    stream = TextStream(stop=["END", "", "\n"])
    stream.push(0, b"one\ntwo END")
    assert stream.find_stop() == (3, "\n")


def test_stops_match_case_sensitively() -> None:
    stream = TextStream(stop=["END"])
    assert feed(stream, [b"the end", b" EN"]) == ["the end", " "]  # "end" is not "END"
    assert stream.find_stop() is None


def test_trim_stop_semantics_text_excludes_the_stop_and_reports_it() -> None:
    """The engine's text never includes the stop string; it reports which one matched so
    KoboldCpp (trim_stop false) can append it: text + stop is the model's text up to the end
    of the stop, and anything after it in the same token is gone either way."""
    stream = TextStream(stop=[" 6", "\n\n"])
    sent = feed(stream, [b"4 5"])
    stream.push(1, b" 6 7")
    found = stream.find_stop()
    assert found == (3, " 6")
    cut, which = found
    sent.append(stream.cut_at(cut))
    assert "".join(sent) == stream.text == "4 5"
    assert stream.text + which == "4 5 6"


def test_limit_ending_flushes_the_held_tail() -> None:
    stream = TextStream(stop=["</s>"])
    assert feed(stream, [b"a </"]) == ["a "]
    assert stream.flush() == "</"
    assert stream.text == "a </"


def test_no_stops_or_bans_holds_nothing() -> None:
    stream = TextStream(stop=[""], banned=[""])
    assert stream.hold == 0
    assert feed(stream, [b"<", b"/"]) == ["<", "/"]


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab<>/s \n", max_size=30),
    st.lists(st.integers(1, 5), max_size=30),
    st.sampled_from(["</s>", "\n\n", "ab", "s"]),
)
def test_stop_found_and_nothing_past_it_sent_for_any_split(
    text: str, cuts: list[int], stop: str
) -> None:
    data = text.encode()
    stream = TextStream(stop=[stop])
    sent, i = [], 0
    for n in [*cuts, len(data)]:
        piece, i = data[i : i + n], i + n
        if not piece:
            continue
        stream.push(0, piece)
        found = stream.find_stop()
        if found is not None:
            sent.append(stream.cut_at(found[0]))
            break
        sent.append(stream.ready())
    else:
        sent.append(stream.flush())
    expected = text.split(stop)[0]
    assert "".join(sent) == expected == stream.text


# ---- banned phrases --------------------------------------------------------------------------


def test_banned_phrase_rolls_back_to_the_token_that_began_it() -> None:
    stream = TextStream(banned=["Bad Word"])
    sent = feed(stream, [b"This is ", b"a b", b"AD"])
    # Whole tokens are held once a tail could begin the phrase: "a b" waits.
    assert sent == ["This is ", "", ""]
    stream.push(3, b" word!")
    hit = stream.banned_hit()
    assert hit == 10  # case-insensitive: "bAD word" starts at "b" of "a b"
    assert stream.roll_back(hit) == Rollback(index=1, token=1)
    assert stream.tokens == [0]
    assert stream.char_ends == [8]
    assert stream.text == "This is "
    assert stream.emitted == 8
    # Decoding restarts cleanly from the kept tokens.
    assert feed(stream, [b"a go", b"od word"]) == ["a go", "od word"]


def test_banned_phrase_after_a_character_that_lengthens_when_lowered() -> None:
    # "İ".lower() is two characters: matching on str.lower() put the hit one place late
    # and rolled back from the wrong token (or failed to find one at all).
    stream = TextStream(banned=["bad"])
    feed(stream, ["İİİ ".encode(), b"ok "])
    stream.push(2, b"BAD")
    hit = stream.banned_hit()
    assert hit == 7
    assert stream.roll_back(hit) == Rollback(index=2, token=2)
    assert stream.text == "İİİ ok "


def test_banned_phrase_at_a_token_boundary_bans_that_token() -> None:
    stream = TextStream(banned=["foo"])
    feed(stream, [b"x", b"y "])
    stream.push(2, b"foo")
    hit = stream.banned_hit()
    assert hit == 3
    assert stream.roll_back(hit) == Rollback(index=2, token=2)
    assert stream.text == "xy "


def test_banned_phrase_in_the_first_token_rolls_back_everything() -> None:
    stream = TextStream(banned=["no"])
    stream.push(7, b"Nope")
    assert stream.roll_back(stream.banned_hit()) == Rollback(index=0, token=7)
    assert stream.text == "" and stream.tokens == [] and stream.char_ends == []


def test_held_tail_under_a_ban_is_case_insensitive_and_whole_tokens() -> None:
    stream = TextStream(banned=["shiver"])
    assert feed(stream, [b"A ", b"cold S", b"HI"]) == ["A ", "", ""]
    stream.push(3, b"ny day")  # diverged: everything is released at once
    assert stream.banned_hit() is None
    assert stream.ready() == "cold SHIny day"


def test_rollbacks_stop_after_the_limit_and_the_text_ends_at_the_phrase() -> None:
    stream = TextStream(banned=["zz"])
    feed(stream, [b"ok "])
    for _ in range(MAX_BACKTRACKS):
        stream.push(1, b"zz")
        assert stream.roll_back(stream.banned_hit()) == Rollback(index=1, token=1)
    stream.push(1, b"azz")
    hit = stream.banned_hit()
    assert hit == 4
    assert stream.roll_back(hit) is None
    assert stream.text == "ok a"
    assert stream.flush() == "a"


def test_suffix_prefix_counts_proper_prefixes_only() -> None:
    assert suffix_prefix("abc</", "</s>") == 2
    assert suffix_prefix("</s>", "</s>") == 0  # a whole match is a stop, not a hold
    assert suffix_prefix("x<", "</s>") == 1
    assert suffix_prefix("", "</s>") == 0
    assert suffix_prefix("abc", "") == 0
