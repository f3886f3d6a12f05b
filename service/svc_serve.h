/* `attnd serve`: runs the gRPC server until SIGTERM or SIGINT, then drains. */
#ifndef AT_SERVICE_SVC_SERVE_H
#define AT_SERVICE_SVC_SERVE_H

/* argv[0] is "serve". Returns the exit status: 0 after a clean stop, 1 when something failed,
 * 2 for bad usage. Thread: the main thread, before any other thread exists. */
int svc_serve_main(int argc, char **argv);

#endif
