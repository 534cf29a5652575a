"""Run-time plumbing shared by every stage: seeding, devices, checkpoints, progress and logging."""
