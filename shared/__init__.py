"""What the API pods and the workers share: settings, Redis names, the event model, ids, errors."""
