"""ML core of SelfAugment: augmentation ops and policies, MoCo v2, evaluation, data."""
