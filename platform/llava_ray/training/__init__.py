"""Stage training: schedule, collate, step, DeepSpeed engine, Ray Train loop and driver."""
