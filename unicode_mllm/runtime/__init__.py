"""Run-time plumbing shared by every stage: seeding, devices, checkpoints, the run folder's files, the optimizer's
parameter groups, lr schedules, progress and logging."""
