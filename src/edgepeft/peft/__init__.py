"""peft layer."""
