"""torchaq.quantizers.calibrate.successive_halving: budget, early stopping, the never-below-isotropic rule."""
import torch

from torchaq.quantizers.calibrate import AnisotropyRule, candidate_rules, successive_halving


def _run(true_scores):
    """Candidates whose score after r alternations is true_scores[rule] * (1 - 0.1 / r)."""
    rules = candidate_rules(AnisotropyRule("threshold", 0.2))
    trained = []

    def train(rule, codebooks, rounds):
        trained.append(str(rule))
        done = 0 if codebooks is None else int(codebooks.item())
        return torch.tensor(float(done + rounds))

    def score(rule, codebooks):
        rounds = max(1.0, float(codebooks.item()))
        return true_scores.get(str(rule), 0.0) * (1 - 0.1 / rounds) if str(rule) != "isotropic" else true_scores["isotropic"]

    return rules, trained, successive_halving(rules, train, score, torch.tensor(0.0))


def test_halving_finds_the_best_with_about_two_alternations_per_candidate():
    scores = {"isotropic": 0.5, "threshold=0.2": 0.6, "eta=1.25": 0.55, "eta=1.5": 0.58, "eta=2": 0.62,
              "eta=3": 0.7, "eta=4": 0.66, "eta=6": 0.64, "eta=8": 0.61}
    rules, trained, (best, codebooks, rounds, seen) = _run(scores)
    assert str(best) == "eta=3" and rounds == int(codebooks.item()) == 4  # 8 -> 4 -> 2 -> 1
    assert len(trained) == 8 + 4 + 2 + 1 <= 2 * (len(rules) - 1)
    assert seen[str(best)] >= seen["isotropic"]


def test_candidates_below_isotropic_stop_early_and_isotropic_can_win():
    scores = {"isotropic": 0.9, "eta=2": 1.1}  # the others score 0: dropped after one alternation
    _, trained, (best, _, _, seen) = _run(scores)
    assert str(best) == "eta=2" and trained.count("eta=2") == 1 and len(trained) == 8
    _, trained, (best, codebooks, rounds, seen) = _run({"isotropic": 1.0})
    assert str(best) == "isotropic" and rounds == 0 and len(trained) == 8
    assert all(v <= seen["isotropic"] for v in seen.values())
