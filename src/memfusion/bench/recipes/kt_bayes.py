"""The best achievable prediction on Synthetic-5: the Bayes posterior predictive of the generator itself.

A knowledge-tracing model sees a student's past responses, never the student's latent skills, so
the AUC of the generator's true probabilities (``oracle_auc``) is out of any model's reach. The
reachable ceiling is the AUC of ``P(r_t = 1 | r_1 .. r_{t-1})`` under the generator's own model,
with its exact parameters (the exercises' concepts and difficulties, the guess rate, the priors):

    g ~ N(ability_mean, ability_sd^2),   u_k ~ N(0, concept_sd^2) per concept k,   rate ~ U(learn_rate),
    skill_t = g + u_{k_t} + rate * n_t,   p_t = guess + (1 - guess) sigmoid(skill_t - beta_t),

``n_t`` the student's earlier exercises of concept ``k_t`` (see
:class:`~memfusion.bench.tasks.tracing.Synthetic5`). Given the rate and the general ability, the
concepts' deviations are independent, so the posterior is computed exactly on a grid: ``g`` on
``general_points`` values and each ``u_k`` on ``concept_points`` values within ``span`` standard
deviations (the normal priors renormalised on the grids; a zero standard deviation is one point),
the rate on ``rate_points`` values of its range, for a chunk of students at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memfusion.bench.recipes.base import need
from memfusion.bench.tasks.tracing import Synthetic5


def _normal_grid(mean: float, sd: float, points: int, span: float) -> tuple[Tensor, Tensor]:
    """(values (P,), log prior (P,)) of N(mean, sd^2) on a grid; one point when sd is 0."""
    if sd == 0.0:
        return torch.tensor([mean], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    values = torch.linspace(mean - span * sd, mean + span * sd, points, dtype=torch.float64)
    return values, torch.log_softmax(-0.5 * ((values - mean) / sd) ** 2, dim=0)


def bayes_predictions(
    responses: Tensor,
    concept: Tensor,
    difficulty: Tensor,
    generator: Synthetic5,
    general_points: int = 41,
    concept_points: int = 33,
    rate_points: int = 6,
    span: float = 4.5,
    chunk: int = 250,
) -> Tensor:
    """responses (S, E) in {0, 1} (student s answered exercise t at step t), concept (E,) long,
    difficulty (E,), generator: the priors and the guess rate -> (S, E) float64: ``P(r_t = 1 | r_<t)``
    under the Synthetic-5 model. Students are processed ``chunk`` at a time (memory
    ``chunk * rate_points * general_points * K * concept_points`` float64 values)."""
    need(responses.dim() == 2, f"responses must be (S, E), got {tuple(responses.shape)}")
    s, e = responses.shape
    need(concept.shape == (e,) and difficulty.shape == (e,), "concept and difficulty must be (E,)")
    need(min(general_points, concept_points) >= 2 and rate_points >= 1 and chunk >= 1, "grids too small")
    k = int(concept.max()) + 1
    general, log_general = _normal_grid(generator.ability_mean, generator.ability_sd, general_points, span)  # (G,)
    dev, log_dev = _normal_grid(0.0, generator.concept_sd, concept_points, span)  # (U,)
    lo, hi = generator.learn_rate
    rate = torch.linspace(lo, hi, rate_points if hi > lo else 1, dtype=torch.float64)  # (R,), uniform prior
    onehot = torch.nn.functional.one_hot(concept, k).double()  # (E, K)
    earlier = (torch.cumsum(onehot, 0) - onehot).gather(1, concept[:, None]).squeeze(1)  # (E,) n_t
    prior = log_general[None, :, None]  # (1, G, 1); the rate's prior is uniform: a constant
    out = torch.zeros(s, e, dtype=torch.float64)
    for start in range(0, s, chunk):
        y = responses[start : start + chunk].double()  # (C, E)
        c_n = y.shape[0]
        loglik = torch.zeros(c_n, len(rate), len(general), k, len(dev), dtype=torch.float64)  # (C, R, G, K, U)
        for t in range(e):
            c = int(concept[t])
            skill = general[None, :, None] + dev[None, None, :] + rate[:, None, None] * earlier[t]  # (R, G, U)
            p = generator.guess + (1.0 - generator.guess) * torch.sigmoid(skill - float(difficulty[t]))  # (R, G, U)
            evidence = torch.logsumexp(loglik + log_dev, dim=-1)  # (C, R, G, K): log P(concept's past | rate, g)
            others = evidence.sum(-1) - evidence[..., c]  # (C, R, G): the other concepts tell about rate and g
            joint = others[..., None] + loglik[:, :, :, c] + log_dev + prior  # (C, R, G, U)
            post = torch.softmax(joint.reshape(c_n, -1), dim=-1).reshape(joint.shape)
            out[start : start + c_n, t] = (post * p).sum(dim=(1, 2, 3))
            yt = y[:, t, None, None, None]  # (C, 1, 1, 1)
            loglik[:, :, :, c] += yt * torch.log(p) + (1.0 - yt) * torch.log1p(-p)
    return out
