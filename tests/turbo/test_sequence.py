from lmcompress.turbo.sequence import FinishReason, Sequence, SequenceStatus


def test_new_sequence_is_waiting_with_nothing_computed():
    seq = Sequence("r0", [5, 6, 7])
    assert seq.prompt_token_ids == (5, 6, 7)
    assert seq.status is SequenceStatus.WAITING
    assert (seq.num_computed_tokens, seq.block_table, seq.output_token_ids) == (0, [], [])
    assert not seq.is_finished


def test_counts_cover_prompt_and_outputs():
    seq = Sequence("r0", [1, 2, 3])
    seq.output_token_ids += [4, 5]
    assert (seq.num_prompt_tokens, seq.num_output_tokens, seq.num_tokens) == (3, 2, 5)


def test_token_slice_spans_the_prompt_output_boundary():
    seq = Sequence("r0", [1, 2, 3])
    seq.output_token_ids += [4, 5, 6]
    every = (1, 2, 3, 4, 5, 6)
    for start in range(7):
        for end in range(start, 7):
            assert seq.token_slice(start, end) == every[start:end]


def test_sequences_compare_by_identity():
    a, b = Sequence("r0", [1]), Sequence("r0", [1])
    assert a != b and len({a, b}) == 2


def test_finish_reasons_use_the_openai_strings():
    assert [r.value for r in FinishReason] == ["stop", "length", "abort", "error"]
    assert FinishReason.LENGTH == "length"
