"""`jaxsft chat` command handling, fed lines without a terminal: /help, /reset, /system, /exit,
Ctrl-C during a reply, and the end of input (Ctrl-D)."""

from jaxsft.data.formats import Message
from jaxsft.infer.chat import HELP, ChatLoop


def _session(lines, system=None, interrupt_on=()):
    seen, answers, notes = [], [], []

    def reply(history):
        seen.append(list(history))
        if history[-1].content in interrupt_on:
            raise KeyboardInterrupt
        return f"answer {len(seen)}"

    loop = ChatLoop(reply, system, answers.append, notes.append)
    handled = [loop.handle(line) for line in lines]
    return loop, seen, answers, notes, handled


def test_turns_build_the_history_and_empty_lines_are_skipped():
    loop, seen, answers, _, _ = _session(["hi", "  ", "again"], system="Be terse.")
    assert answers == ["answer 1", "answer 2"]
    assert seen[1] == [
        Message("system", "Be terse."),
        Message("user", "hi"),
        Message("assistant", "answer 1"),
        Message("user", "again"),
    ]


def test_reset_forgets_the_turns_and_keeps_the_system_prompt():
    loop, seen, _, notes, _ = _session(["hi", "/reset", "fresh"], system="S")
    assert seen[-1] == [Message("system", "S"), Message("user", "fresh")]
    assert "(conversation cleared)" in notes


def test_system_sets_and_shows_the_system_prompt():
    loop, seen, _, notes, _ = _session(["/system", "/system You speak French.", "/system", "bonjour"])
    assert notes[0] == "(no system prompt)" and notes[2] == "system prompt: 'You speak French.'"
    assert seen[-1][0] == Message("system", "You speak French.")


def test_help_exit_and_unknown_commands():
    _, seen, _, notes, handled = _session(["/help", "/nope", "/exit"])
    assert notes[0] == HELP and "unknown command /nope" in notes[1]
    assert handled == [True, True, False] and not seen  # commands never reach the model


def test_ctrl_c_during_a_reply_drops_that_turn_and_keeps_the_session():
    loop, seen, answers, notes, handled = _session(["slow question", "next"], interrupt_on={"slow question"})
    assert handled == [True, True] and "(reply stopped)" in notes
    assert answers == ["answer 2"] and seen[-1] == [Message("user", "next")]


def test_end_of_input_leaves_cleanly(monkeypatch, capsys):
    """Ctrl-D at the prompt (input() raises EOFError) ends `jaxsft chat` with status 0."""
    from jaxsft import cli
    from jaxsft.infer import chat as chat_lib

    class FakeSession:
        def __init__(self, source, sampling):
            pass

        def reply(self, conversations):
            return ["ok"]

    monkeypatch.setattr(chat_lib, "Session", FakeSession)
    monkeypatch.setattr(chat_lib, "banner", lambda source, session: f"banner of {source}")
    lines = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(lines))
    assert cli.main(["chat", "some/run"]) == 0
    out = capsys.readouterr()
    assert out.out == "ok\n" and "banner of some/run" in out.err

    def eof(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert cli.main(["chat", "some/run"]) == 0
