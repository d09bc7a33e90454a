"""The math of each method, as pure functions of tensors with hand-computed tests (tests/losses/).

lm.py: next-token cross-entropy (pretrain, SFT). pairwise.py: Bradley-Terry (the reward model).
ppo.py: GAE, whitening, KL estimators and controllers, clipped policy and value losses.
distill.py: forward KL, reverse KL and GKD's generalised JSD between a student's and a teacher's tokens; the sequence KL.
A new method adds one file here; its stage module holds the loop, not the arithmetic.
"""
