import pytest
import torch

from coalora.metrics import accuracy_gap, hypervolume, mean_cosine


def test_hypervolume_of_one_point_is_its_box():
    # 3 bits in a [2, 6] range -> x = 0.75; accuracy 0.8 -> y = 0.8.
    assert hypervolume([3.0], [0.8], (2.0, 6.0)) == pytest.approx(0.75 * 0.8)


def test_hypervolume_ignores_dominated_points_and_adds_staircase():
    front = hypervolume([2.0, 4.0], [0.5, 1.0], (2.0, 6.0))
    assert front == pytest.approx(1.0 * 0.5 + 0.5 * 0.5)
    assert hypervolume([2.0, 4.0, 5.0], [0.5, 1.0, 0.6], (2.0, 6.0)) == pytest.approx(front)


def test_hypervolume_rewards_better_points():
    base = hypervolume([2.5, 3.0, 4.0], [0.80, 0.84, 0.86], (2.0, 8.0))
    assert hypervolume([2.5, 3.0, 4.0], [0.82, 0.84, 0.86], (2.0, 8.0)) > base
    assert hypervolume([2.4, 3.0, 4.0], [0.80, 0.84, 0.86], (2.0, 8.0)) > base


def test_hypervolume_for_perplexity_prefers_lower():
    low = hypervolume([3.0], [20.0], (2.0, 6.0), value_range=(10.0, 100.0), higher_is_better=False)
    high = hypervolume([3.0], [40.0], (2.0, 6.0), value_range=(10.0, 100.0), higher_is_better=False)
    assert low > high > 0


@pytest.mark.parametrize(("bits", "values", "message"), [
    ([], [], "at least one"), ([1.0, 2.0], [0.5], "equally many"),
])
def test_hypervolume_bad_input(bits, values, message):
    with pytest.raises(ValueError, match=message):
        hypervolume(bits, values, (2.0, 6.0))
    with pytest.raises(ValueError, match="ranges must be increasing"):
        hypervolume([3.0], [0.5], (6.0, 2.0))


def test_accuracy_gap_in_points_over_shared_configurations():
    assert accuracy_gap({"a": 0.90, "b": 0.80, "c": 0.5}, {"a": 0.88, "b": 0.81}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no configuration was evaluated for both"):
        accuracy_gap({"a": 0.9}, {"b": 0.9})


def test_mean_cosine_is_one_for_alike_rows_zero_for_orthogonal_and_leaves_out_self_pairs():
    assert mean_cosine(torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])) == pytest.approx(1.0)
    assert mean_cosine(torch.eye(4)) == pytest.approx(0.0)  # self-pairs counted would give 1/4
    assert mean_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        mean_cosine(torch.ones(1, 3))


def test_sentence_features_read_the_first_token_of_the_last_layer_up_to_a_limit_and_keep_the_mode():
    from transformers import AutoModelForSequenceClassification, BertConfig

    from coalora import lora, models
    from coalora.configs import QuantSpace
    from coalora.metrics import sentence_features

    torch.manual_seed(0)
    backbone = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    model = lora.build_lora_model(backbone, models.matrix_layout(backbone, "tiny-bert"), QuantSpace.nf(),
                                  config_aware=False, task_type="classification")
    lora.set_configuration(model, None).train()
    batches = [{"input_ids": torch.randint(1, 50, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])} for _ in range(3)]
    features, labels = sentence_features(model, batches, limit=6)
    assert features.shape == (6, 16) and features.dtype == torch.float32 and model.training  # mode given back
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    with torch.no_grad():
        expected = model.eval()(input_ids=batches[0]["input_ids"], output_hidden_states=True).hidden_states[-1][:, 0]
    torch.testing.assert_close(features[:4], expected)
    half, _ = sentence_features(model, batches, precision="bf16")
    assert len(half) == 12 and not model.training
    torch.testing.assert_close(half[:4], expected, atol=0.05, rtol=0.05)  # bf16 autocast: close, not equal
