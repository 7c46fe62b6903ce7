"""The web console of the ingress: server-rendered pages under /console and their static assets."""
