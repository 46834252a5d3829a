"""The best achievable prediction on Synthetic-5: the Bayes posterior predictive of the generator itself.

A knowledge-tracing model sees a student's past responses, never the student's latent skills, so
the AUC of the generator's true probabilities (``oracle_auc``) is out of any model's reach. The
reachable ceiling is the AUC of ``P(r_t = 1 | r_1 .. r_{t-1})`` under the generator's own model,
with its exact parameters (the exercises' concepts and difficulties, the guess rate, the priors):

    alpha_k ~ N(0, 1) per concept k,   rate ~ U(learn_rate),   skill_t = alpha_{k_t} + rate * n_t,
    p_t = guess + (1 - guess) sigmoid(skill_t - beta_t),

``n_t`` the student's earlier exercises of concept ``k_t`` (see
:class:`~memfusion.bench.tasks.tracing.Synthetic5`). Given the rate, the concepts' skills are
independent, so the posterior is computed exactly on a grid: ``alpha`` on ``alpha_points`` values in
``[-alpha_range, alpha_range]`` (the N(0, 1) prior renormalised on the grid) and the rate on
``rate_points`` values of its range, for every student at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memfusion.bench.recipes.base import need


def bayes_predictions(
    responses: Tensor,
    concept: Tensor,
    difficulty: Tensor,
    guess: float,
    learn_rate: tuple[float, float],
    alpha_points: int = 81,
    alpha_range: float = 5.0,
    rate_points: int = 11,
) -> Tensor:
    """responses (S, E) in {0, 1} (student s answered exercise t at step t), concept (E,) long,
    difficulty (E,) -> (S, E) float64: ``P(r_t = 1 | r_<t)`` under the Synthetic-5 model."""
    need(responses.dim() == 2, f"responses must be (S, E), got {tuple(responses.shape)}")
    s, e = responses.shape
    need(concept.shape == (e,) and difficulty.shape == (e,), "concept and difficulty must be (E,)")
    need(alpha_points >= 2 and rate_points >= 1, "need alpha_points >= 2 and rate_points >= 1")
    k = int(concept.max()) + 1
    alpha = torch.linspace(-alpha_range, alpha_range, alpha_points, dtype=torch.float64)  # (A,)
    log_prior = torch.log_softmax(-0.5 * alpha**2, dim=0)  # (A,) N(0, 1) on the grid
    lo, hi = learn_rate
    rate = torch.linspace(lo, hi, rate_points, dtype=torch.float64)  # (R,), uniform prior
    onehot = torch.nn.functional.one_hot(concept, k).double()  # (E, K)
    earlier = (torch.cumsum(onehot, 0) - onehot).gather(1, concept[:, None]).squeeze(1)  # (E,) n_t
    loglik = torch.zeros(s, rate_points, k, alpha_points, dtype=torch.float64)  # (S, R, K, A)
    out = torch.zeros(s, e, dtype=torch.float64)
    y = responses.double()
    for t in range(e):
        c = int(concept[t])
        skill = alpha[None, :] + rate[:, None] * earlier[t]  # (R, A)
        p = guess + (1.0 - guess) * torch.sigmoid(skill - float(difficulty[t]))  # (R, A)
        evidence = torch.logsumexp(loglik + log_prior, dim=-1)  # (S, R, K): log P(concept's past | rate)
        others = evidence.sum(-1) - evidence[:, :, c]  # (S, R): the other concepts tell about the rate
        joint = others[:, :, None] + loglik[:, :, c] + log_prior  # (S, R, A): log P(rate, alpha_c, past)
        post = torch.softmax(joint.reshape(s, -1), dim=-1).reshape(joint.shape)  # (S, R, A)
        out[:, t] = (post * p).sum(dim=(1, 2))
        yt = y[:, t, None, None]  # (S, 1, 1)
        loglik[:, :, c] += yt * torch.log(p) + (1.0 - yt) * torch.log1p(-p)
    return out
