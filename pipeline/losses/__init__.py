"""The math of each method, as pure functions of tensors with hand-computed tests (tests/losses/).

lm.py: next-token cross-entropy (pretrain, SFT). pairwise.py: Bradley-Terry (the reward model).
ppo.py: GAE, whitening, KL estimators and controllers, clipped policy and value losses.
A new method adds one file here; its stage module holds the loop, not the arithmetic.
"""
